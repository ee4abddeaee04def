"""Event-camera streams: one in-memory type, readers and writers for two file formats, and a simulator.

``EventStream`` holds events sorted by time (x, y, t in µs, p in {0, 1}, sensor_size = (height,
width)), validated once when built; ``stream.to_frames(...)`` rasterises it with
``crossspec_kernels.events_to_frames``.

Formats:
    DSEC ``events.h5`` (``DSECEventFile``, ``write_dsec_h5``): uint16 x/y, uint32 t relative to an
        int64 ``t_offset``, uint8 p, and ``ms_to_idx`` (first event index of every millisecond),
        which lets a time window be read without loading the file. Needs h5py
        (``pip install 'crossspec-kernels[events]'``); real DSEC files also need hdf5plugin.
    EventGPT ``.npy`` (``load_eventgpt_npy``, ``save_eventgpt_npy``): a dict {'x', 'y', 't', 'p'} saved
        with ``np.save``, i.e. a pickle, read by a restricted unpickler that builds only dicts, lists
        and numpy arrays (``UnsafePickleError`` otherwise; ``trust_pickle=True`` opts out).
    Synthetic (``synthetic_clip``): a moving scene rendered both as events and as RGB video frames,
        for tests and demos without data.
"""

from crossspec_kernels.events.dsec import DSECEventFile, write_dsec_h5
from crossspec_kernels.events.eventgpt import UnsafePickleError, load_eventgpt_npy, save_eventgpt_npy
from crossspec_kernels.events.stream import EventStream
from crossspec_kernels.events.synthetic import frame_times_us, synthetic_clip

__all__ = [
    "DSECEventFile",
    "EventStream",
    "UnsafePickleError",
    "frame_times_us",
    "load_eventgpt_npy",
    "save_eventgpt_npy",
    "synthetic_clip",
    "write_dsec_h5",
]

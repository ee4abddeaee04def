"""tqdm progress bars, or plain prints when tqdm is not importable."""

from __future__ import annotations

import sys


class _PlainProgress:
    def __init__(self, total=None, desc="", unit="it", disable=False, **_):
        self.total, self.desc, self.unit, self.disable = total, desc, unit, disable
        self.count, self._last_pct = 0, -1

    def update(self, n=1):
        self.count += n
        if self.disable or not self.total:
            return
        pct = int(100 * self.count / self.total)
        if pct // 10 != self._last_pct // 10:
            self._last_pct = pct
            print(f"{self.desc}: {self.count}/{self.total} {self.unit} ({pct}%)", file=sys.stderr)

    def set_postfix(self, *_, **__):
        pass

    def close(self):
        pass


def progress(total=None, desc="", unit="it", disable=False):
    """A progress bar with update/set_postfix/close; tqdm when available."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainProgress(total=total, desc=desc, unit=unit, disable=disable)
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, leave=False)

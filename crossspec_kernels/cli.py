"""The ``crossspec`` command.

crossspec demo   run the rejection-resampling op (crossspec_kernels.verify) on a sample
crossspec info   versions, whether the CUDA extension is built, devices, backend choice
crossspec adapter extract|train|eval   the adapter toolchain (crossspec_kernels.adapter_tools)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from dataclasses import dataclass

import torch

BACKEND_CHOICES = ("auto", "cuda", "triton", "reference")

# A small draft tree: the root has children 0 and 1; node 0 has children 2 and 3; node 1 has child 4;
# node 2 has child 5.
TREE_PARENTS = (-1, -1, 0, 0, 1, 2)
# Greedy demo: which draft nodes of each request equal the target argmax, so requests accept
# different amounts (request b uses entry b % 4).
CHAIN_MATCHES = (5, 3, 1, 0)  # the first m chain nodes match
TREE_MATCHES = ({1, 4}, {0, 2, 5}, {0, 3}, set())
# Sampled demo: how far each request's draft distribution q is from the target p (noise on logits).
DRAFT_NOISE = (0.25, 0.5, 1.0, 2.0)


@dataclass
class Case:
    title: str
    target_logits: torch.Tensor  # [B, N+1, V]
    draft_tokens: torch.Tensor  # [B, N]
    parents: torch.Tensor | None  # [N] or None (chain)
    draft_probs: torch.Tensor | None  # [B, N+1, V] or None
    temperature: float


def _parent_rows(num_nodes: int, parents: torch.Tensor | None) -> list[int]:
    """Row of target_logits that scores node i's token: its parent's row (root = row 0)."""
    if parents is None:
        return list(range(num_nodes))
    return [int(p) + 1 for p in parents]


def _greedy_tokens(logits: torch.Tensor, rows: list[int], matches: list[set[int]], gen) -> torch.Tensor:
    """Draft tokens equal to the target argmax at the nodes in ``matches[b]``, different elsewhere."""
    batch, _, vocab = logits.shape
    argmax = logits.argmax(dim=-1)  # [B, N+1]
    tokens = torch.empty((batch, len(rows)), dtype=torch.int64)
    for b in range(batch):
        for node, row in enumerate(rows):
            best = int(argmax[b, row])
            if node in matches[b]:
                tokens[b, node] = best
            else:  # any other token: the target's greedy choice disagrees here
                shift = int(torch.randint(1, vocab, (1,), generator=gen))
                tokens[b, node] = (best + shift) % vocab
    return tokens


def _sampled_case(title, logits, parents, temperature, gen) -> tuple[Case, list[float]]:
    """Drafts drawn from a noisy copy q of the target p; children of a node are i.i.d. from its row."""
    batch, slots, vocab = logits.shape
    noise = torch.tensor([DRAFT_NOISE[b % len(DRAFT_NOISE)] for b in range(batch)]).view(batch, 1, 1)
    draft_logits = logits + noise * torch.randn(logits.shape, generator=gen)
    p = torch.softmax(logits / temperature, dim=-1)
    q = torch.softmax(draft_logits / temperature, dim=-1)
    rows = _parent_rows(slots - 1, parents)
    tokens = torch.stack([torch.multinomial(q[:, row], 1, generator=gen).squeeze(1) for row in rows], dim=1)
    # Per-step acceptance probability alpha = sum_x min(p, q), averaged over the rows used.
    alpha = torch.minimum(p, q).sum(-1)[:, sorted(set(rows))].mean(-1)
    return Case(title, logits, tokens, parents, q, temperature), alpha.tolist()


def build_demo_cases(batch: int, vocab: int, seed: int, device: torch.device):
    gen = torch.Generator().manual_seed(seed)
    chain_nodes = 5
    tree = torch.tensor(TREE_PARENTS, dtype=torch.int64)
    tree_nodes = len(TREE_PARENTS)

    chain_logits = 3.0 * torch.randn((batch, chain_nodes + 1, vocab), generator=gen)
    tree_logits = 3.0 * torch.randn((batch, tree_nodes + 1, vocab), generator=gen)
    chain_matches = [set(range(CHAIN_MATCHES[b % 4])) for b in range(batch)]
    tree_matches = [TREE_MATCHES[b % 4] for b in range(batch)]

    cases = [
        Case(
            f"greedy, chain of {chain_nodes} draft tokens, deterministic candidates",
            chain_logits,
            _greedy_tokens(chain_logits, _parent_rows(chain_nodes, None), chain_matches, gen),
            None,
            None,
            0.0,
        ),
        Case(
            f"greedy, tree of {tree_nodes} draft nodes (parents {list(TREE_PARENTS)})",
            tree_logits,
            _greedy_tokens(tree_logits, _parent_rows(tree_nodes, tree), tree_matches, gen),
            tree,
            None,
            0.0,
        ),
    ]
    alphas = [None, None]
    for title, logits, parents in (
        (f"sampled T=1, chain of {chain_nodes} draft tokens drawn from draft_probs", chain_logits, None),
        (f"sampled T=1, tree of {tree_nodes} draft nodes drawn from draft_probs", tree_logits, tree),
    ):
        case, alpha = _sampled_case(title, logits, parents, 1.0, gen)
        cases.append(case)
        alphas.append(alpha)

    def to_device(case: Case) -> Case:
        move = lambda t: None if t is None else t.to(device)
        return Case(
            case.title,
            move(case.target_logits),
            move(case.draft_tokens),
            move(case.parents),
            move(case.draft_probs),
            case.temperature,
        )

    return [to_device(c) for c in cases], alphas


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("crossspec demo: --device cuda asked for, but torch sees no CUDA device")
    return device


def _pick_backend(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    from crossspec_kernels.ops._dispatch import pick_backend

    return pick_backend("verify", backend, device, dtype)


def _fmt(values: list[int]) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


def run_demo(args: argparse.Namespace) -> int:
    import crossspec_kernels

    device = _resolve_device(args.device)
    requested = None if args.backend == "auto" else args.backend
    try:
        backend = _pick_backend(requested, device, torch.float32)
    except (RuntimeError, ValueError) as error:
        print(f"crossspec demo: backend {args.backend!r} cannot run here: {error}", file=sys.stderr)
        return 2

    print("crossspec demo: rejection resampling (crossspec_kernels.verify) on a random sample.")
    print(
        "This is a sample of the verify op on random logits, not the speculative-decoding engine "
        "(drafter + target model), which is not in the package yet."
    )
    print(
        f"B={args.batch} requests, V={args.vocab}, fp32 logits, device={device}, backend={backend}, "
        f"seed={args.seed}\n"
    )

    cases, alphas = build_demo_cases(args.batch, args.vocab, args.seed, device)
    for case, alpha in zip(cases, alphas):
        out = crossspec_kernels.verify(
            case.target_logits,
            case.draft_tokens,
            case.parents,
            case.draft_probs,
            temperature=case.temperature,
            seed=args.seed,
            backend=backend,
        )
        print(f"== {case.title} [backend: {backend}]")
        rows = []
        for b in range(args.batch):
            path = _fmt([int(v) for v in out.path[b] if int(v) >= 0])
            tokens = _fmt([int(v) for v in out.tokens[b] if int(v) >= 0])
            rows.append((b, int(out.num_accepted[b]), path, tokens))
        path_width = max(len("path (node ids)"), *(len(r[2]) for r in rows))
        token_width = max(len("tokens (accepted drafts + correction/bonus)"), *(len(r[3]) for r in rows))
        header = f"{'request':>7}  {'accepted':>8}  {'path (node ids)':<{path_width}}  "
        header += f"{'tokens (accepted drafts + correction/bonus)':<{token_width}}"
        print((header + ("  alpha = sum min(p, q)" if alpha is not None else "")).rstrip())
        for b, accepted, path, tokens in rows:
            line = f"{b:>7}  {accepted:>8}  {path:<{path_width}}  {tokens:<{token_width}}"
            print((line + (f"  {alpha[b]:.2f}" if alpha is not None else "")).rstrip())
        print()
    print(
        "Each row keeps the accepted draft tokens plus one token from the target (a correction or, "
        "when every draft on the path was accepted, a bonus). Greedy rows accept exactly the drafts "
        "that equal the target argmax; sampled rows accept more when alpha is high."
    )
    return 0


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except ImportError:
        return "not installed"
    return getattr(module, "__version__", "unknown")


def run_info(args: argparse.Namespace) -> int:
    import crossspec_kernels
    from crossspec_kernels import _ext

    rows: list[tuple[str, str]] = [
        (
            "crossspec_kernels",
            f"{crossspec_kernels.__version__} ({os.path.dirname(crossspec_kernels.__file__)})",
        ),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", platform.platform()),
        ("torch", f"{torch.__version__} (CUDA build: {torch.version.cuda or 'none'})"),
        ("triton", _version("triton")),
        ("numpy", _version("numpy")),
        ("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "unset")),
    ]
    if _ext.is_available():
        ext = _ext.get_module()
        version = ext.cuda_version()
        rows += [
            ("_C extension", f"built ({ext.__file__})"),
            ("_C CUDA archs", ext.cuda_archs()),
            ("_C CUDA runtime", f"{version // 1000}.{version % 1000 // 10} (static cudart)"),
            ("_C device count", str(ext.device_count())),
        ]
    else:
        reason = "unknown"
        try:
            _ext.get_module()
        except RuntimeError as error:
            reason = str(error)
        rows.append(("_C extension", f"not built: {reason}"))

    cuda = torch.cuda.is_available()
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    rows.append(("CUDA devices (torch)", ", ".join(devices) if devices else "none"))

    for device, note in (
        (torch.device("cpu"), ""),
        (torch.device("cuda"), "" if cuda else " (no device here)"),
    ):
        try:
            choice = _pick_backend(None, device, torch.float32)
        except (RuntimeError, ValueError) as error:
            choice = f"none ({error})"
        rows.append((f"verify on {device.type} tensors", choice + note))

    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossspec", description="Cross-modal speculative decoding kernels for video LLMs."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the verify op (rejection resampling) on a random sample")
    demo.add_argument("--batch", type=int, default=4, help="requests in the batch (default 4)")
    demo.add_argument("--vocab", type=int, default=32064, help="vocabulary size (default 32064, Vicuna)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the sample and of the Philox noise")
    demo.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:i]")
    demo.add_argument(
        "--backend", choices=BACKEND_CHOICES, default="auto", help="force a backend (default: dispatch)"
    )
    demo.set_defaults(func=run_demo)

    info = sub.add_parser("info", help="versions, extension build, devices and backend choice")
    info.set_defaults(func=run_info)

    from crossspec_kernels.adapter_tools.cli import add_adapter_parser

    add_adapter_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo" and (args.batch < 1 or args.vocab < 2):
        raise SystemExit("crossspec demo: --batch must be >= 1 and --vocab >= 2")
    try:
        if args.command == "adapter":
            from crossspec_kernels.adapter_tools.cli import run_adapter

            return run_adapter(args)
        return args.func(args)
    except BrokenPipeError:  # e.g. `crossspec demo | head`: stop quietly, like other CLI tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())

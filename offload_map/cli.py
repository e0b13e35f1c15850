"""The ``offload-map`` command line.

``offload-map demo [--device DEV] [--steps N]`` builds a tiny pipeline in code, prints its compiled device
map, runs it under every strategy and prints each report and whether the output matches the resident run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from .compiler import STRATEGIES, compile_device_map
from .dispatch import dispatch_pipeline


def _demo(args: argparse.Namespace) -> int:
    from .demo import make_tiny_pipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = make_tiny_pipeline()
    reference = pipe("a red cat", steps=args.steps)
    print(f"tiny pipeline: {sum(p.numel() for p in pipe.parameters()):,} parameters; target device {device}\n")
    print(compile_device_map(pipe, "layerwise", device, window=args.window))
    ok = True
    for strategy in STRATEGIES:
        handle = dispatch_pipeline(pipe, strategy, device, window=args.window)
        start = time.perf_counter()
        image = pipe("a red cat", steps=args.steps)
        elapsed = time.perf_counter() - start
        same = torch.equal(image, reference)
        ok &= same
        print(f"\n== strategy {strategy!r}: {elapsed * 1e3:.1f} ms, output {'identical to' if same else 'DIFFERS from'} the resident run")
        print(handle.report())
        handle.remove()
    print("\nall strategies bit-identical" if ok else "\nMISMATCH")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``offload-map`` console script."""
    parser = argparse.ArgumentParser(prog="offload-map", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a tiny pipeline under every strategy and print the device map and reports")
    demo.add_argument("--device", help="target device (default: cuda if available, else cpu)")
    demo.add_argument("--steps", type=int, default=4, help="denoising steps (default 4)")
    demo.add_argument("--window", type=int, default=2, help="layer-window slots (default 2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    return _demo(args)


if __name__ == "__main__":
    sys.exit(main())

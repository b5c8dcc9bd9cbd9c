"""Convert an original GHN checkpoint (PyTorch `.pt`) into a ghn_jax file.

Usage:
  python experiments/convert_checkpoint.py ghn2_cifar10.pt ghn2_cifar10.npz

Reads the released checkpoints of the original GHN-1/GHN-2 (ppuda:
`ghn1_cifar10.pt`, `ghn2_cifar10.pt`, `ghn2_imagenet.pt`, ...) without
PyTorch: the file is unzipped and unpickled with an unpickler that only
rebuilds tensors. The output loads with `ghn_jax.ghn.load_ghn`.
"""

from __future__ import annotations

import sys

from absl import app, logging

from ghn_jax import checkpoint_import


def main(argv: list[str]) -> int:
  if len(argv) != 3:
    print(__doc__, file=sys.stderr)
    return 2
  in_path, out_path = argv[1], argv[2]
  try:
    config = checkpoint_import.convert_checkpoint(in_path, out_path)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  logging.info("converted %s -> %s", in_path, out_path)
  print(f"wrote {out_path}: {config}")
  return 0


if __name__ == "__main__":
  app.run(main)

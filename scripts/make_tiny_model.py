"""Build the embedded tiny random-weight model(s) named in the model registry.

    python scripts/make_tiny_model.py                   # every `builtin` pipeline in configs/models.yaml
    python scripts/make_tiny_model.py --kind tiny-sdxl --out /tmp/tiny-sdxl

Does nothing for a pipeline whose directory already holds a model.
"""

from __future__ import annotations

import argparse

from serve_app.config import load_registry
from serve_app.pipeline.tiny import TINY_KINDS, save_tiny_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="configs/models.yaml", help="model registry to read")
    parser.add_argument("--kind", choices=TINY_KINDS, help="build one model of this kind at --out instead")
    parser.add_argument("--out", help="target directory for --kind")
    args = parser.parse_args()
    if args.kind:
        if not args.out:
            parser.error("--kind needs --out")
        print(save_tiny_pipeline(args.out, args.kind))
        return
    for name, pipeline in load_registry(args.models).pipelines.items():
        if pipeline.builtin:
            print(f"{name}: {save_tiny_pipeline(pipeline.path, pipeline.builtin)}")


if __name__ == "__main__":
    main()

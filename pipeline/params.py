"""Write `params.yaml` from `conf/`, or check that it is up to date.

python -m pipeline.params                      # rewrite params.yaml from conf/
python -m pipeline.params --check              # exit 1 if params.yaml has drifted
python -m pipeline.params optimizer.lr=0.001   # with Hydra overrides, as dvc exp -S
"""

from __future__ import annotations

import sys

from pipeline import config
from pipeline.errors import PipelineError


def render(overrides: list[str] | None = None) -> str:
    """Compose `conf/` with overrides, validate it, and return it as params.yaml text."""
    composed = config.compose(overrides)
    config.validate(composed)
    return config.to_yaml(composed)


def main(argv: list[str]) -> int:
    check = "--check" in argv
    overrides = [arg for arg in argv if arg != "--check"]
    try:
        text = render(overrides)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if check:
        current = (
            config.PARAMS_FILE.read_text(encoding="utf-8") if config.PARAMS_FILE.is_file() else ""
        )
        if current != text:
            print(
                "params.yaml differs from conf/; run `python -m pipeline.params`", file=sys.stderr
            )
            return 1
        print("params.yaml matches conf/")
        return 0
    config.PARAMS_FILE.write_text(text, encoding="utf-8")
    print(f"wrote {config.PARAMS_FILE.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""``python -m tova_vllm budget ...``: plan a TOVA budget before serving (see budget.py)."""

import sys

COMMANDS = ("budget",)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m tova_vllm {{{','.join(COMMANDS)}}} ... "
                         "(python -m tova_vllm budget --help)")
    from .budget import main as budget_main

    budget_main(argv[1:])


if __name__ == "__main__":
    main()

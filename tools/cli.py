"""The bevjepa command line."""

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    return 0


if __name__ == "__main__":
    sys.exit(main())

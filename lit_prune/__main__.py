"""Entry point of ``python -m lit_prune``."""

from lit_prune.cli import cli_main

if __name__ == "__main__":
    cli_main()

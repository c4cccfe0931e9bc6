"""The ``metagrad`` command (also ``python -m metagrad``): process tuning first, then the command line.

libgomp reads its wait policy, and torch its huge-page switch (``METAGRAD_MALLOC=huge``), once, when
torch loads, so :func:`main` sets them before anything imports torch: this module and
``metagrad/__init__.py`` import none (``metagrad._openmp`` and ``metagrad._malloc`` explain the settings;
glibc's ``mallopt`` is called later, in :func:`metagrad.cli.main`, since it works at any time).
"""

from __future__ import annotations


def tune_before_torch() -> None:
    """What the command sets before torch loads: OpenMP's wait policy and, for ``METAGRAD_MALLOC=huge``,
    torch's huge pages (each with its switch). For a script that wants the command's process settings."""
    from metagrad import _malloc, _openmp

    _openmp.tune_wait()
    _malloc.request_huge_pages()


def main() -> int:
    """Apply :func:`tune_before_torch`, then run the command."""
    tune_before_torch()
    from metagrad.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())

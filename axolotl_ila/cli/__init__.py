"""The command line: ``axolotl-ila`` (``commands``), the same commands as
``axolotl ila`` (``axolotl_group``), and the quick start (``quickstart``, on
the tiny workspace of ``workspace``). Nothing is imported here, so that
``axolotl --help`` loads only the group's module."""

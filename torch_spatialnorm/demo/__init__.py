"""The demo: ``python -m torch_spatialnorm.demo`` (see ``--help``)."""

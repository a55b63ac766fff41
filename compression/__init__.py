"""The ``compression`` command and what its subcommands share (local servers, logging)."""

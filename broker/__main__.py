"""``python -m broker``: the same as the ``broker`` command."""
from broker.cli import main

if __name__ == "__main__":
    main(prog_name="broker")

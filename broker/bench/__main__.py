"""``python -m broker.bench``: the same as ``broker bench``."""
from broker.bench.cli import bench

if __name__ == "__main__":
    bench(prog_name="broker bench")

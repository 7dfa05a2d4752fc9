"""Plot a run's metrics on demand: `python tools/plot_metrics.py runs/tiny/metrics.jsonl [out.png]`."""

import sys

from r1mega.trainers.plots import plot_metrics

if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    print(plot_metrics(*sys.argv[1:]))

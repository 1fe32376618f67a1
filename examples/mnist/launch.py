"""Starts the processes of one run of ``python -m examples.mnist`` on this machine::

    python -m examples.mnist.launch --num-processes 2 --devices 8 --epochs 1

(see :mod:`examples.common.launch`).
"""

from examples.common import launch
from examples.mnist.main import check_launch

if __name__ == "__main__":
    launch.main(program="examples.mnist", check=check_launch)

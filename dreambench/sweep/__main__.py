"""`python -m dreambench.sweep reset <sweep folder>`: see dreambench/sweep/reset.py."""

from dreambench.sweep.reset import main

main()

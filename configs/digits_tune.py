"""Every method tuned against Gold on digits, then compared over 5 evaluation seeds.

  python -m jaxunlearn.main --config configs/digits_tune.py --workdir runs/tune-class
  python -m jaxunlearn.main --config configs/digits_tune.py --workdir runs/tune-random \\
      --config.scenario=random

`configs/digits_methods.py`'s data, model, recipes and seeds (0-4), with a search:
each method gets the same budget, 12 Optuna TPE trials, over its declared space
(`SEARCH_SPACE` in its module), on the tuning seed 1000's Original and Gold, trained
on 90% of the training set and judged on the held-out 10% (never the test set),
minimising the avg gap to Gold. Then the tuned methods run on seeds 0-4 into
<workdir>/eval, where results.md sits beside the default-settings tables of
`digits_methods.py`. Digits' epochs are a few batches (17 retain, 3 forget): epochs
are searched from 1 to twice the method's mapped default, and each search's first
trial is the default settings themselves.

Time (2-core CPU): ~30 min per scenario with other jobs running (README, "Tuning
every method against Gold").
"""
import os

from jaxunlearn import config, search


def get_config():
  c = config.from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "digits_methods.py"))
  c.tune.methods = "all"
  c.tune.trials = 12
  # Digits' epochs are a few batches (3 forget / 17 retain): search 1 to twice each
  # method's mapped default (the first trial is the default itself).
  c.tune.space = ",".join(f"{m}.epochs=1:{2 * c[m].epochs}" for m in search.method_list(c)
                          if "epochs" in search.declared(m))
  return c

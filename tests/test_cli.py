"""Bad input on the command line: one line, one exit status, nothing written.

Most cases go through `main.check`, the command line's parse and validation run
in-process; three run the real command, to see its exit status and stderr.
"""
import os
import re
import subprocess
import sys
import tempfile

import pytest
from hypothesis import given, settings, strategies as st

from jaxunlearn import config as config_lib, main
from jaxunlearn.methods import METHODS

# Hypothesis' caches in a fresh folder, not .hypothesis/ in the repository (read lazily).
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", tempfile.mkdtemp(prefix="jaxunlearn-test-"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.py")
FIELDS = config_lib.field_names(config_lib.get_base_config())
SECTIONS = sorted({f.rsplit(".", 1)[0] for f in FIELDS if "." in f})


def argv(*args, config=DIGITS, workdir="/nonexistent/w"):
  return ["jaxunlearn.main", "--config", config, "--workdir", workdir, *args]


def input_error(*args, **kwargs) -> str:
  """The one-line InputError of a command line that must fail."""
  with pytest.raises(main.InputError) as e:
    main.check(argv(*args, **kwargs))
  message = str(e.value)
  assert message and "\n" not in message
  return message


def _sgd(section):
  return [(f"{section}.epochs", "0"), (f"{section}.learning_rate", "nan"),
          (f"{section}.momentum", "1"), (f"{section}.weight_decay", "-1"),
          (f"{section}.optimizer", "rmsprop"), (f"{section}.beta2", "1"),
          (f"{section}.eps", "0"), (f"{section}.schedule", "linear"),
          (f"{section}.final_learning_rate", "-1"), (f"{section}.decay_epochs", "0"),
          (f"{section}.decay_factor", "0"), (f"{section}.warmup_epochs", "-1"),
          (f"{section}.batch_size", "-1")]


# One bad command-line value for every field of the base config.
BAD_VALUES = [
    ("seed", "-1"), ("seeds", "0"), ("scenario", "sub"), ("forget_class", "-1"),
    ("forget_subclass", "rocket,lamp"),
    ("forget_fraction", "1.0"), ("data.name", "CIFAR-10"), ("data.test_size", "0"),
    ("data.label", "coarse label"), ("data.image_size", "-1"), ("data.mean", "0.5;0.4"),
    ("data.std", "0"), ("data.augment", "flip"),
    ("data.split_seed", "-1"), ("data.prepare", "maybe"), ("data.synthetic.num_train", "1"),
    ("data.synthetic.num_test", "0"), ("data.synthetic.image_size", "0"),
    ("model.vit.variant", "Ti/32"), ("model.vit.image_size", "0"), ("model.vit.patch_size", "0"),
    ("model.vit.hidden_size", "-64"), ("model.vit.depth", "0"), ("model.vit.num_heads", "0"),
    ("model.vit.mlp_dim", "0"), ("model.vit.layer_norm_eps", "0"), ("model.dtype", "float16"),
    ("model.name", "resnet19"), ("model.resnet.width", "0"), ("model.resnet.stage_sizes", "2,,2"),
    ("batch_size", "0"), *_sgd("train"), ("methods", "finetune,unlearn_everything"),
    *[case for m in METHODS if "epochs" in METHODS[m].get_config() for case in _sgd(m)],
    ("boundary_shrinking.bound", "0"), ("fcs.temperature", "0"),
    ("fcs.stage1_learning_rate", "0"), ("scrub.forget_batch_size", "-1"), ("ssd.batch_size", "-1"),
    ("fcs.retain_learning_rate", "-1"), ("fcs.retain_weight_decay", "-inf"),
    ("l1_sparse.alpha", "-1"), ("neggrad_plus.alpha", "1.5"), ("salun.mask_fraction", "0"),
    ("scrub.temperature", "0"), ("scrub.gamma", "nan"), ("scrub.alpha", "-1"),
    ("scrub.max_epochs", "-1"), ("ssd.alpha", "-1"), ("ssd.dampening", "inf"),
    ("ssd_det.alpha", "-1"), ("ssd_det.dampening", "inf"), ("ssd_det.batch_size", "-1"),
    ("two_stage.temperature", "0"), ("two_stage.stage1_steps", "-1"),
    ("eval.batch_size", "0"), ("tsne.num_retain", "-1"), ("tsne.num_forget", "-300"),
    ("tsne.perplexity", "0"), ("checkpoint_every_seconds", "-1"),
    ("checkpoint_every_chunks", "-1"), ("steps_per_chunk", "0"), ("progress", "maybe"),
    ("concurrent_stages", "2"), ("distributed", "yes please"),
    ("cluster.coordinator_address", "10.0.0.1"), ("cluster.num_processes", "-1"),
    ("cluster.process_id", "-2"), ("cluster.timeout_seconds", "0"),
    ("data.validation_fraction", "1"), ("data.hold_out", "1"), ("tune.methods", "finetune,nope"), ("tune.trials", "0"),
    ("tune.objective", "accuracy"), ("tune.sampler", "grid"), ("tune.seed", "-1"),
    ("tune.minutes", "-1"), ("tune.space", "scrub.alpha"),
]
# Any string is valid here (a path; "" for off or unset), checked where it is used.
FREE_TEXT = {"compilation_cache", "data.data_dir", "data.manual_dir", "data.folder", "model.init",
             "tuned"}


def test_every_field_has_a_bad_value():
  assert sorted(f for f, _ in BAD_VALUES) == sorted(set(FIELDS) - FREE_TEXT)


@pytest.mark.parametrize("field, value", BAD_VALUES, ids=[f"{f}={v}" for f, v in BAD_VALUES])
def test_bad_value_names_its_field(field, value):
  message = input_error(f"--config.{field}={value}")
  assert re.match(rf"(--)?config\.{re.escape(field)}: ", message), message


@pytest.mark.parametrize("arg, message", [
    ("--config.nosuchfield=1", "--config.nosuchfield: no such field; closest: --config.train.schedule"),
    ("--config.learning_rate=0.1", "--config.learning_rate: no such field; closest: "
     "--config.fcs.learning_rate, --config.train.learning_rate"),
    ("--config.model.dept=2", "--config.model.dept: no such field; closest: --config.model.vit.depth"),
    ("--config.seed.x=1", "--config.seed.x: no such field; closest: --config.seed"),
    ("--config.model={}", "--config.model is a section; set its fields, e.g. --config.model."),
    ("--config.batch_size=abc", "--config.batch_size: must be an integer, got 'abc'"),
    ("--config.train.learning_rate=fast", "--config.train.learning_rate: must be a number"),
    ("--config.progress=", "--config.progress: must be true or false, got ''"),
    ("--config.tsne.perplexity=0", "config.tsne.perplexity: must be a finite number in (0, inf)"),
    ("--config.train.learning_rate=inf", "config.train.learning_rate: must be a finite number"),
    ("--config.model.vit.depth=0", "config.model.vit.depth: must be an integer >= 1"),
    ("--config.data.synthetic.num_train=0",
     "config.data.synthetic.num_train: must be an integer >= 2"),
    ("--config.batch_size=3000000000", "config.batch_size: must be below 2**31"),
    ("--config.seeds=100000000", "config.seeds: must name distinct seeds in [0, 2**31) or a count"),
    ("--config.model.vit.variant=Ti/16",
     "config.model.vit.variant: patch size 16 does not divide image_size 8"),
    ("--workdirr=x", "Unknown command line flag 'workdirr'"),
    ("stray", "unexpected arguments: 'stray'"),
])
def test_one_line_errors(arg, message):
  assert input_error(arg).startswith(message)


def test_fields_checked_together():
  assert input_error("--config.cluster.num_processes=2", "--config.cluster.process_id=2") == (
      "config.cluster.process_id: must be below num_processes 2, got 2")
  assert input_error("--config.batch_size=1", "--config.tsne.num_retain=1",
                     "--config.tsne.num_forget=0").startswith(
      "config.tsne.num_retain: t-SNE needs 2 points or more")


def test_required_flags_and_order():
  for args, message in [
      (["jaxunlearn.main", "--workdir", "w"], "--config is required"),
      (["jaxunlearn.main", "--config", DIGITS], "--workdir is required"),
      (["jaxunlearn.main", "--config.seed=1", "--config", DIGITS, "--workdir", "w"],
       "Found --config.seed=1 in argv before a value for --config"),
  ]:
    with pytest.raises(main.InputError, match=re.escape(message)):
      main.check(args)


def test_config_file_errors(tmp_path):
  def write(name, text):
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)

  cases = [
      (str(tmp_path / "missing.py"), "--config: no such file: "),
      (str(tmp_path), "--config: is a folder, not a file"),
      (write("syntax.py", "def get_config(:\n  pass\n"),
       "syntax.py, line 1: SyntaxError: invalid syntax"),
      (write("raises.py", "def get_config():\n  x = 1\n  return {}['model']\n"),
       "raises.py, line 3: KeyError: 'model'"),
      (write("imports.py", "import no_such_module\n"),
       "imports.py, line 1: ModuleNotFoundError: No module named 'no_such_module'"),
      (write("noget.py", "x = 1\n"), "noget.py defines no get_config()"),
      (write("none.py", "def get_config():\n  pass\n"), "returned NoneType, not a ConfigDict"),
      # A misspelt field, set in the file before the config is locked.
      (write("typo.py", "from jaxunlearn.config import get_base_config\n"
             "def get_config():\n  c = get_base_config()\n  c.train.learnig_rate = 0.1\n"
             "  return c\n"),
       "config.train.learnig_rate: unknown field; closest: config.train.learning_rate"),
  ]
  for path, message in cases:
    assert message in input_error(config=path), path


def test_valid_overrides_are_applied():
  config, workdir = main.check(argv(
      "--config.methods=all", "--config.seed", "7", "--noconfig.progress", "--config.model.init=",
      "--config.train.learning_rate=0.5", "--config.cluster.process_id=2"))
  assert (config.seed, config.progress, config.model.init, config.train.learning_rate) == (
      7, False, "", 0.5)
  assert config_lib.method_names(config) == tuple(METHODS) and workdir == "/nonexistent/w"


# Values bad for most fields: out of range, not finite, too large, not a number, empty.
BAD = ["-1", "0", "-0.0", "nan", "inf", "-inf", "1e400", str(2 ** 31), str(10 ** 30), "9" * 5000,
       "", " ", "abc", "none", "true", "1.5", "{}", "0,0", "-", "Ti/16", "all"]
values = st.one_of(st.sampled_from(BAD), st.integers().map(str), st.floats().map(str),
                   st.text(max_size=6))
unknown = st.one_of(st.text(st.sampled_from("abcdefgh_.0"), min_size=1, max_size=12),
                    st.text(max_size=8)).filter(lambda n: n not in FIELDS and n not in SECTIONS)
names = st.one_of(st.sampled_from(FIELDS), st.sampled_from(SECTIONS), unknown)


@settings(max_examples=150, deadline=None, database=None)
@given(st.lists(st.tuples(names, values), min_size=1, max_size=3))
def test_random_bad_overrides_give_one_line(overrides):
  try:
    config, _ = main.check(argv(*[f"--config.{n}={v}" for n, v in overrides]))
  except main.InputError as e:
    message = str(e)
    assert message and "\n" not in message
    if len(overrides) == 1 and overrides[0][0] in FIELDS:
      # It names the field, or the one the value conflicts with and the value's own.
      field = overrides[0][0]
      assert field in message or field.rsplit(".", 1)[-1] in message, message
  else:
    config_lib.validate(config)  # accepted: the values happened to be valid


# The real command, one case per place an error is caught: parsing the command line,
# validating the config, the run looking for its weights. Started together (each spends
# seconds importing JAX), checked one by one.
CLI_CASES = {
    "unknown field": ["--config.nosuchfield=1"],
    "perplexity 0": ["--config.tsne.perplexity=0"],
    "missing weights": ["--config.model.init=/nonexistent/weights"],
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cli")
  procs = {}
  for name, args in CLI_CASES.items():
    workdir = tmp / name.replace(" ", "_")
    procs[name] = workdir, subprocess.Popen(
        [sys.executable, "-m", *argv(*args, workdir=str(workdir))], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  out = {}
  for name, (workdir, p) in procs.items():
    _, stderr = p.communicate(timeout=300)
    out[name] = workdir, p.returncode, stderr
  return out


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_one_line_exit_status_no_workdir(cli_runs, name):
  workdir, returncode, stderr = cli_runs[name]
  assert returncode == main.EXIT_INPUT_ERROR, stderr
  assert stderr.strip().splitlines()[-1].startswith("error: "), stderr
  assert "Traceback" not in stderr
  assert not workdir.exists()


def _check_inputs(tmp_path, *args):
  workdir = tmp_path / "w"
  out = subprocess.run([sys.executable, "-m", *argv("--check_inputs", *args, workdir=str(workdir))],
                       cwd=ROOT, text=True, capture_output=True, timeout=300)
  assert not workdir.exists()  # it checks; nothing is written
  return out


def test_check_inputs_loads_the_data_and_builds_the_model_without_writing(tmp_path):
  from jaxunlearn import tfds_data
  tfds_data.write_fake("cifar100", str(tmp_path / "tfds"), num_train=200, num_test=100,
                       class_names={"label": tuple(f"fine_{i:02d}" for i in range(100))})
  out = _check_inputs(tmp_path, f"--config.data.data_dir={tmp_path / 'tfds'}",
                      "--config.data.name=cifar100", "--config.data.label=coarse",
                      "--config.scenario=subclass", "--config.forget_subclass=fine_27",
                      "--config.model.name=resnet18", "--config.model.resnet.width=4",
                      "--config.batch_size=32", "--config.methods=finetune")
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.startswith("inputs ok: cifar100: 2 forget / 198 retain training examples "
                               "(sub-class 27 (fine_27) of class 7) / 100 test examples, 20 "
                               "classes; resnet18 with "), out.stdout


@pytest.mark.parametrize("args, message", [
    (["--config.data.name=cifar100", "--config.data.data_dir=/nonexistent/tfds"],
     "error: CIFAR-100 not found at /nonexistent/tfds/cifar100/"),
    (["--config.forget_class=12"], "error: config.forget_class: 12 is out of range; allowed: 0..9"),
], ids=["missing data", "class out of range"])
def test_check_inputs_refuses_what_a_run_would(tmp_path, args, message):
  out = _check_inputs(tmp_path, *args)
  assert out.returncode == main.EXIT_INPUT_ERROR, out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith(message), out.stderr

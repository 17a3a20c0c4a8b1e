"""Configs under ``configs/`` and ``score_sde.config_checks.validate_config``.

Every config file (found by glob, so new ones are covered) must load and validate. Values are checked
against the paper (hard-coded numbers below) and, field by field, against all 42 config files of the original
(``tests/golden/configs_original.json``, dumped once from the original's code).
"""
from __future__ import annotations

import importlib
import json
import math
import pathlib

import pytest

from score_sde import config_checks
from score_sde.config_checks import validate_config

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / 'configs'


def _module_name(path: pathlib.Path) -> str:
    return '.'.join(path.relative_to(REPO).with_suffix('').parts)


CONFIG_FILES = sorted(p for p in CONFIGS.rglob('*.py')
                      if p.name != '__init__.py' and not p.name.startswith('default_'))
DEFAULT_FILES = sorted(CONFIGS.glob('default_*_configs.py'))
NCSN_V1_FILES = sorted(p for p in (CONFIGS / 've' / 'ncsn').glob('*.py') if p.name != '__init__.py')


def load(relpath: str):
    """``get_config()`` of ``configs/<relpath>``, e.g. ``load('vp/cifar10.py')``."""
    return importlib.import_module(_module_name(CONFIGS / relpath)).get_config()


def _flatten(tree: dict, prefix: str = '') -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def test_every_original_config_has_a_file():
    names = {p.relative_to(CONFIGS).as_posix() for p in CONFIG_FILES + DEFAULT_FILES}
    original = {
        'default_cifar10_configs.py', 'default_celeba_configs.py', 'default_lsun_configs.py',
        *(f'subvp/cifar10_{a}_continuous.py' for a in ('ddpm', 'ddpmpp', 'ddpmpp_deep', 'ncsnpp', 'ncsnpp_deep')),
        *(f've/{n}.py' for n in ('bedroom_ncsnpp_continuous', 'celeba_ncsnpp', 'celebahq_256_ncsnpp_continuous',
                                 'celebahq_ncsnpp_continuous', 'church_ncsnpp_continuous', 'cifar10_ddpm',
                                 'cifar10_ncsnpp', 'cifar10_ncsnpp_continuous', 'cifar10_ncsnpp_deep_continuous',
                                 'ffhq_256_ncsnpp_continuous', 'ffhq_ncsnpp_continuous')),
        *(f've/ncsn/{d}{s}.py' for d in ('cifar10', 'celeba') for s in ('', '_124', '_1245', '_5')),
        *(f've/ncsnv2/{n}.py' for n in ('bedroom', 'celeba', 'cifar10')),
        *(f'vp/cifar10_{a}.py' for a in ('ddpmpp', 'ddpmpp_continuous', 'ddpmpp_deep_continuous', 'ncsnpp',
                                        'ncsnpp_continuous', 'ncsnpp_deep_continuous')),
        *(f'vp/ddpm/{n}.py' for n in ('bedroom', 'celebahq', 'church', 'cifar10', 'cifar10_continuous',
                                     'cifar10_unconditional')),
    }
    assert len(original) == 42
    assert original <= names, sorted(original - names)


@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_config_loads_and_validates(path):
    config = importlib.import_module(_module_name(path)).get_config()
    validate_config(config, mode='train')
    validate_config(config, mode='eval')


@pytest.mark.parametrize('path', NCSN_V1_FILES, ids=lambda p: p.name)
def test_ncsn_v1_num_classes_follows_num_scales(path):
    config = importlib.import_module(_module_name(path)).get_config()
    assert config.model.name == 'ncsn'
    assert config.model.num_classes == config.model.num_scales
    config.model.num_scales = 7  # a --config.model.num_scales override carries over
    assert config.model.num_classes == 7
    config.model.num_classes = 9  # and the other way round: they cannot disagree
    assert config.model.num_scales == 9


@pytest.mark.parametrize('short, long', [('vp/cifar10.py', 'vp/cifar10_ddpmpp_continuous.py'),
                                         ('ve/cifar10.py', 've/cifar10_ncsnpp_continuous.py'),
                                         ('subvp/cifar10.py', 'subvp/cifar10_ddpmpp_continuous.py')])
def test_short_paths_equal_their_long_configs(short, long):
    assert load(short).to_dict() == load(long).to_dict()


@pytest.mark.parametrize('path', DEFAULT_FILES, ids=lambda p: p.name)
def test_defaults_have_the_new_fields(path):
    config = importlib.import_module(_module_name(path)).get_default_configs()
    assert config.sampling.ode_solver == 'jax'
    assert config.sampling.ode_rtol == config.sampling.ode_atol == 1e-5
    assert config.data.data_dir is None and config.eval.inception_path is None
    # typed placeholders: a command-line string override is accepted
    config.data.data_dir = '/tmp/tfds'
    config.eval.inception_path = '/tmp/inception'
    with pytest.raises(TypeError):
        config.data.data_dir = 3


# --------------------------------------------------------------------------- paper values
# (config, field, value): Song et al. 2021, Appendix / the released configs' hyperparameters.
PAPER_VALUES = [
    ('vp/cifar10.py', 'training.sde', 'vpsde'),
    ('vp/cifar10.py', 'model.beta_min', 0.1),
    ('vp/cifar10.py', 'model.beta_max', 20.),
    ('vp/cifar10.py', 'model.num_scales', 1000),
    ('vp/cifar10.py', 'model.ema_rate', 0.9999),
    ('vp/cifar10.py', 'model.num_res_blocks', 4),
    ('vp/cifar10.py', 'model.ch_mult', (1, 2, 2, 2)),
    ('vp/cifar10.py', 'sampling.predictor', 'euler_maruyama'),
    ('vp/cifar10.py', 'data.centered', True),
    ('subvp/cifar10.py', 'training.sde', 'subvpsde'),
    ('ve/cifar10.py', 'training.sde', 'vesde'),
    ('ve/cifar10.py', 'model.sigma_min', 0.01),
    ('ve/cifar10.py', 'model.sigma_max', 50),
    ('ve/cifar10.py', 'sampling.snr', 0.16),
    ('ve/cifar10.py', 'model.ema_rate', 0.999),
    ('ve/cifar10.py', 'sampling.predictor', 'reverse_diffusion'),
    ('ve/cifar10.py', 'sampling.corrector', 'langevin'),
    ('ve/cifar10.py', 'model.fir', True),
    ('ve/cifar10.py', 'optim.lr', 2e-4),
    ('ve/cifar10.py', 'optim.warmup', 5000),
    ('ve/cifar10.py', 'training.batch_size', 128),
    ('ve/cifar10_ncsnpp_deep_continuous.py', 'model.num_res_blocks', 8),
    ('ve/cifar10_ncsnpp_deep_continuous.py', 'training.n_iters', 950001),
    ('ve/celeba_ncsnpp.py', 'model.sigma_max', 90.),
    ('ve/celeba_ncsnpp.py', 'sampling.snr', 0.17),
    ('ve/bedroom_ncsnpp_continuous.py', 'model.sigma_max', 378),
    ('ve/church_ncsnpp_continuous.py', 'model.sigma_max', 380),
    ('ve/celebahq_256_ncsnpp_continuous.py', 'model.sigma_max', 348),
    ('ve/bedroom_ncsnpp_continuous.py', 'sampling.snr', 0.075),
    ('ve/bedroom_ncsnpp_continuous.py', 'model.num_scales', 2000),
    ('ve/ffhq_ncsnpp_continuous.py', 'model.sigma_max', 1348),
    ('ve/ffhq_ncsnpp_continuous.py', 'data.image_size', 1024),
    ('ve/ncsnv2/cifar10.py', 'model.num_scales', 232),
    ('ve/ncsnv2/celeba.py', 'model.num_scales', 500),
    ('ve/ncsnv2/bedroom.py', 'model.num_scales', 1086),
    ('ve/ncsnv2/bedroom.py', 'model.sigma_max', 190),
    ('ve/ncsn/cifar10.py', 'model.num_scales', 10),
    ('ve/ncsn/cifar10.py', 'sampling.snr', 0.316),
    ('ve/ncsn/cifar10.py', 'sampling.n_steps_each', 100),
    ('ve/ncsn/cifar10.py', 'model.sigma_max', 1),
    ('vp/ddpm/cifar10.py', 'model.num_res_blocks', 2),
    ('vp/ddpm/cifar10.py', 'sampling.predictor', 'ancestral_sampling'),
    ('vp/ddpm/bedroom.py', 'optim.lr', 2e-5),
    ('vp/ddpm/bedroom.py', 'model.ch_mult', (1, 1, 2, 2, 4, 4)),
]


@pytest.mark.parametrize('relpath, field, value', PAPER_VALUES)
def test_paper_values(relpath, field, value):
    node = load(relpath)
    for part in field.split('.'):
        node = node[part]
    if isinstance(value, float):
        assert math.isclose(node, value)
    else:
        assert node == value and type(node) is type(value)


# --------------------------------------------------------------------------- all 42 against the original
# The original's configs, every field resolved, dumped once from its code (recipe: tests/golden/README.md).
GOLDEN_CONFIGS = REPO / 'tests' / 'golden' / 'configs_original.json'


def _decode(value):
    """A golden leaf as the original held it: ``{"tuple": [...]}`` marks a tuple (JSON has only lists)."""
    return tuple(value['tuple']) if isinstance(value, dict) else value


ORIGINAL = {path: {field: _decode(value) for field, value in fields.items()}
            for path, fields in json.loads(GOLDEN_CONFIGS.read_text()).items()}

# Deliberate differences from the original files (each documented in the file itself). Nothing else may differ.
NEW_FIELDS = {'sampling.ode_solver', 'sampling.ode_rtol', 'sampling.ode_atol', 'data.data_dir', 'eval.inception_path',
              'eval.stats_dir', 'eval.wait_for_checkpoints_s'} | {
    f'sampling.{option}' for option in ('steps', 'order', 'eta', 'churn', 'rho', 'time_schedule', 'lower_order_final',
                                        'adaptive_rtol', 'adaptive_atol', 'denoise_to_zero', 'num_samples', 'ckpt')}
NEW_FIELDS |= {'eval.enable_bound', 'eval.bound_num_times'}  # issue 15: the likelihood bound in --mode eval
NEW_FIELDS |= {'model.remat', 'model.dtype'}  # issue 16: rematerialisation and mixed precision
STANDALONE_ADDED = NEW_FIELDS | {'training.n_jitted_steps', 'eval.enable_sampling', 'eval.enable_loss',
                                 'eval.enable_bpd', 'eval.bpd_dataset', 'model.beta_min', 'model.beta_max'}
ADDED = {'ve/celebahq_ncsnpp_continuous.py': STANDALONE_ADDED, 've/ffhq_ncsnpp_continuous.py': STANDALONE_ADDED,
         've/ncsn/celeba.py': NEW_FIELDS | {'model.num_classes', 'training.sde'}}
ADDED.update({f've/ncsn/{p.name}': ADDED.get(f've/ncsn/{p.name}', NEW_FIELDS | {'model.num_classes'})
              for p in NCSN_V1_FILES})
REMOVED = {'ve/celebahq_ncsnpp_continuous.py': {'device'}, 've/ffhq_ncsnpp_continuous.py': {'device'},
           've/ncsn/celeba.py': {'training.loss'}, 've/ncsnv2/bedroom.py': {'training.continuouse'}}
CHANGED = {('ve/ncsnv2/bedroom.py', 'training.continuous'): False}  # the original's typo left it True


def _ours_flat(relpath: str) -> dict:
    module = importlib.import_module(_module_name(CONFIGS / relpath))
    return _flatten((getattr(module, 'get_config', None) or module.get_default_configs)().to_dict())


def test_golden_holds_the_42_original_files():
    assert len(ORIGINAL) == 42
    assert set(ORIGINAL) <= {p.relative_to(CONFIGS).as_posix() for p in CONFIG_FILES + DEFAULT_FILES}


@pytest.mark.parametrize('relpath', sorted(ORIGINAL))
def test_all_original_configs_match(relpath):
    """Every field of the original file, at the same path in ours: same value and same type (int is not float,
    tuple is not list: a command-line override is parsed by the field's type)."""
    ours, original = _ours_flat(relpath), ORIGINAL[relpath]
    assert set(ours) - set(original) == ADDED.get(relpath, NEW_FIELDS)
    assert set(original) - set(ours) == REMOVED.get(relpath, set())
    wrong = {}
    for field in sorted(set(original) & set(ours)):
        expected = CHANGED.get((relpath, field), original[field])
        if type(ours[field]) is not type(expected) or ours[field] != expected:
            wrong[field] = (ours[field], expected)
    assert not wrong, f'{relpath}: field: (ours, original) {wrong}'


# --------------------------------------------------------------------------- validate_config rejects bad configs
def _bad(field: str, value):
    config = load('vp/cifar10.py')
    node = config
    *parents, leaf = field.split('.')
    for part in parents:
        node = node[part]
    node[leaf] = value
    return config


BAD_CASES = [  # (field, bad value, mode, words the message must contain)
    ('training.sde', 'ousde', 'train', ['vpsde', 'subvpsde', 'vesde']),
    ('model.name', 'unet9000', 'train', []),
    ('sampling.predictor', 'leapfrog', 'train', ['euler_maruyama']),
    ('sampling.corrector', 'metropolis', 'train', ['langevin']),
    ('sampling.method', 'ddpm_magic', 'train', ["'pc'", "'ode'", "'ddim'", "'dpm_solver_pp'"]),
    ('sampling.ode_solver', 'torchdiffeq', 'train', ["'jax'", "'scipy'"]),
    ('data.dataset', 'imagenet', 'train', ['CIFAR10', 'FASHION_MNIST']),
    ('data.image_size', 36, 'train', ['multiple of 8']),
    ('training.log_freq', 52, 'train', ['n_jitted_steps', 'multiple of 5']),
    ('training.eval_freq', 101, 'train', ['n_jitted_steps']),
    ('training.snapshot_freq', 50001, 'train', ['n_jitted_steps']),
    ('training.snapshot_freq_for_preemption', 10001, 'train', ['n_jitted_steps']),
    # _RANGES: each message names the range; open bounds are tested at the bound itself.
    ('model.nf', 0, 'train', ['an integer >= 1']),
    ('model.num_res_blocks', -1, 'eval', ['an integer >= 0']),
    ('model.dropout', 1.0, 'train', ['a number >= 0 and < 1']),
    ('model.dropout', math.nan, 'train', ['a number >= 0 and < 1']),
    ('model.ema_rate', 1.5, 'train', ['a number >= 0 and <= 1']),
    ('model.num_scales', 0, 'eval', ['an integer >= 1']),
    ('model.sigma_max', 0, 'eval', ['a number > 0']),
    ('model.beta_min', -0.1, 'train', ['a number >= 0']),
    ('data.num_channels', 0, 'train', ['an integer >= 1']),
    ('sampling.snr', -0.16, 'eval', ['a number >= 0']),
    ('sampling.n_steps_each', 0, 'eval', ['an integer >= 1']),
    ('training.n_iters', 0, 'train', ['an integer >= 1']),
    ('optim.lr', 0.0, 'train', ['a number > 0']),
    ('optim.warmup', -1, 'train', ['an integer >= 0']),
    ('optim.beta1', 1.0, 'train', ['a number >= 0 and < 1']),
    ('eval.num_samples', 0, 'eval', ['an integer >= 1']),
]


@pytest.mark.parametrize('field, value, mode, words', BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_value_is_reported_with_its_field(field, value, mode, words):
    with pytest.raises(ValueError) as info:
        validate_config(_bad(field, value), mode=mode)
    lines = [line for line in str(info.value).splitlines() if f'config.{field}=' in line]
    assert len(lines) == 1, str(info.value)
    assert repr(value) in lines[0]
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize('field, value, mode', [('optim.lr', -1.0, 'eval'), ('training.n_iters', 0, 'eval'),
                                               ('eval.num_samples', 0, 'train')])
def test_range_applies_to_its_modes_only(field, value, mode):
    validate_config(_bad(field, value), mode=mode)  # raises if the rule were checked in this mode
    with pytest.raises(ValueError, match=f'config.{field}='):
        validate_config(_bad(field, value), mode='train' if mode == 'eval' else 'eval')


@pytest.mark.parametrize('field, value', [('model.dropout', 0.0), ('model.ema_rate', 1.0), ('model.ema_rate', 0.0),
                                          ('model.num_res_blocks', 0), ('optim.warmup', 0), ('optim.eps', 0.0),
                                          ('model.beta_min', 0.0), ('sampling.snr', 0.0)])
def test_range_bounds_that_are_allowed(field, value):
    validate_config(_bad(field, value), mode='train')
    validate_config(_bad(field, value), mode='eval')


def test_registry_contents_are_the_allowed_values():
    """model/predictor/corrector lists come from the registries, so their names appear in the message."""
    from models import utils as model_utils
    import sampling

    for field, names in [('model.name', model_utils.registered_models()),
                         ('sampling.predictor', sampling.registered_predictors()),
                         ('sampling.corrector', sampling.registered_correctors())]:
        with pytest.raises(ValueError) as info:
            validate_config(_bad(field, 'no_such_thing'))
        assert names and all(repr(n) in str(info.value) for n in names)


def test_sde_and_method_are_case_insensitive():
    config = _bad('training.sde', 'VPSDE')
    config.sampling.method = 'ODE'
    validate_config(config)


def test_missing_required_field_is_reported():
    config = load('vp/cifar10.py')
    del config.training['sde']
    with pytest.raises(ValueError, match=r'config\.training\.sde is missing'):
        validate_config(config)


def test_optional_ode_solver_may_be_absent():
    config = load('vp/cifar10.py')
    del config.sampling['ode_solver']
    validate_config(config)


def test_models_without_ch_mult_skip_the_image_size_rule():
    config = load('ve/ncsnv2/cifar10.py')
    config.data.image_size = 33
    validate_config(config)


@pytest.mark.parametrize('field, mode', [('training.batch_size', 'train'), ('eval.batch_size', 'eval')])
def test_batch_size_must_split_over_devices(monkeypatch, field, mode):
    monkeypatch.setattr(config_checks.jax, 'device_count', lambda: 8)
    config = _bad(field, 12)
    with pytest.raises(ValueError, match=rf'config\.{field}=12 is not a multiple of 8'):
        validate_config(config, mode=mode)
    validate_config(_bad(field, 16), mode=mode)


def test_eval_batch_size_not_checked_when_training(monkeypatch):
    monkeypatch.setattr(config_checks.jax, 'device_count', lambda: 8)
    validate_config(_bad('eval.batch_size', 12), mode='train')


def test_every_problem_reported_together():
    config = _bad('training.sde', 'ousde')
    config.data.dataset = 'imagenet'
    config.training.log_freq = 51
    with pytest.raises(ValueError) as info:
        validate_config(config)
    message = str(info.value)
    assert all(f'config.{f}=' in message for f in ('training.sde', 'data.dataset', 'training.log_freq'))
    assert len([line for line in message.splitlines() if line.startswith('  config.')]) == 3


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="mode='sample'"):
        validate_config(load('vp/cifar10.py'), mode='sample')

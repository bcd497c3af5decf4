"""What the manifest's ``generator`` section may name: pipelines, schedulers, scheduler config.

spec/SPEC.md ("Generator section") is the authority. The reader checks the
scheduler config here, key by key, so that ``d3m-inspect check`` refuses
everything rendering would refuse (or would render differently from the
writer): an unknown key is one this reader's diffusers may ignore, so it is
refused rather than silently dropped.

Example:
    >>> check_scheduler_config("DDIMScheduler", {"num_train_timesteps": 1000}, steps=50)
    >>> check_scheduler_config("DDIMScheduler", {"beta_schedule": "cosine"}, steps=50)
    Traceback (most recent call last):
    ...
    d3mfmt.errors.D3MFormatError: manifest.json: generator.scheduler.config.beta_schedule must be one of ['linear', 'scaled_linear', 'squaredcos_cap_v2'], got 'cosine'
"""

from __future__ import annotations

import math

from .errors import D3MFormatError

PIPELINES = ("StableDiffusionPipeline",)

# Schedulers whose sampling is fully defined by the initial latents (no fresh
# noise per step). Ancestral and SDE samplers would make seeds meaningless.
SCHEDULERS = (
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "DEISMultistepScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "UniPCMultistepScheduler",
)

MAX_TRAIN_TIMESTEPS = 10_000  # SD uses 1,000; diffusers allocates tables of this length
MAX_CONFIG_LIST = MAX_TRAIN_TIMESTEPS

# key -> (kind, allowed): kind "bool", "int" (lo, hi), "num" (lo, hi), "choice" (values),
# "num?" (lo, hi) for a number or null, "choice?" (values) for one of them or null,
# "betas" (a list of num_train_timesteps numbers in [0, 1) or null),
# "ints" (a list of step indices), "null" (must be null).
CONFIG_RULES: dict[str, tuple[str, tuple]] = {
    "num_train_timesteps": ("int", (1, MAX_TRAIN_TIMESTEPS)),
    "beta_start": ("num", (0.0, 0.999)),
    "beta_end": ("num", (0.0, 0.999)),
    "beta_schedule": ("choice", ("linear", "scaled_linear", "squaredcos_cap_v2")),
    "trained_betas": ("betas", ()),
    "prediction_type": ("choice", ("epsilon", "sample", "v_prediction")),
    "timestep_spacing": ("choice", ("leading", "trailing", "linspace")),
    "steps_offset": ("int", (0, MAX_TRAIN_TIMESTEPS - 1)),
    "clip_sample": ("bool", ()),
    "clip_sample_range": ("num", (1e-6, 1e6)),
    "set_alpha_to_one": ("bool", ()),
    "thresholding": ("bool", ()),
    "dynamic_thresholding_ratio": ("num", (1e-6, 1.0)),
    "sample_max_value": ("num", (1e-6, 1e6)),
    "rescale_betas_zero_snr": ("bool", ()),
    "algorithm_type": ("choice", ("dpmsolver", "dpmsolver++", "deis")),  # never sde-*: fresh noise per step
    "solver_order": ("int", (1, 3)),
    "solver_type": ("choice", ("midpoint", "heun", "logrho", "bh1", "bh2")),
    "lower_order_final": ("bool", ()),
    "euler_at_final": ("bool", ()),
    "use_karras_sigmas": ("bool", ()),
    "use_exponential_sigmas": ("bool", ()),
    "use_beta_sigmas": ("bool", ()),
    "use_lu_lambdas": ("bool", ()),
    "use_flow_sigmas": ("bool", ()),
    "flow_shift": ("num", (1e-6, 1e6)),
    "use_dynamic_shifting": ("choice", (False,)),  # needs a per-call `mu` the regeneration rule does not pass
    "time_shift_type": ("choice", ("exponential", "linear")),
    "shift_terminal": ("num?", (1e-6, 0.999)),
    "final_sigmas_type": ("choice", ("zero", "sigma_min")),
    "lambda_min_clipped": ("num", (-1e6, 1e6)),
    "variance_type": ("choice?", ("learned", "learned_range")),
    "timestep_type": ("choice", ("discrete", "continuous")),
    "interpolation_type": ("choice", ("linear", "log_linear")),
    "sigma_min": ("num?", (1e-9, 1e6)),
    "sigma_max": ("num?", (1e-9, 1e6)),
    "skip_prk_steps": ("bool", ()),
    "predict_x0": ("bool", ()),
    "disable_corrector": ("ints", ()),
    "solver_p": ("null", ()),  # a scheduler object in diffusers; cannot come from JSON
}
SIGMA_SCHEDULES = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")  # at most one may be true
WHERE = "manifest.json: generator.scheduler.config"


def check_scheduler_config(scheduler: str, config: dict, steps: int) -> None:
    """Raise D3MFormatError unless ``config`` is a scheduler config SPEC.md allows for ``steps`` steps."""
    if scheduler not in SCHEDULERS:
        raise D3MFormatError(
            f"manifest.json: generator.scheduler.class must be a deterministic scheduler, one of {list(SCHEDULERS)}, "
            f"got {scheduler!r}"[:500]
        )
    for key, value in config.items():
        if key.startswith("_"):  # diffusers' bookkeeping (_class_name, _diffusers_version): text only
            if not isinstance(value, str) or len(value) > 256:
                raise _fail(key, "a string of at most 256 characters", value)
            continue
        if key not in CONFIG_RULES:
            raise D3MFormatError(
                f"{WHERE} has unknown key {key!r}; a renderer might ignore it and draw different images. "
                f"Known keys: {sorted(CONFIG_RULES)}"[:800]
            )
        _check_value(key, value, config)
    timesteps = config.get("num_train_timesteps", 1000)
    if steps > timesteps:
        raise D3MFormatError(f"manifest.json: generator.steps {steps} exceeds the scheduler's num_train_timesteps {timesteps}")
    # "leading" spacing (the default of several schedulers) adds steps_offset to every timestep
    offset = config.get("steps_offset", 0)
    if config.get("timestep_spacing", "leading") == "leading" and offset + (steps - 1) * (timesteps // steps) >= timesteps:
        raise _fail("steps_offset", f"small enough that the last of {steps} 'leading' timesteps stays below "
                    f"num_train_timesteps ({timesteps})", offset)
    if sum(config.get(k) is True for k in SIGMA_SCHEDULES) > 1:
        raise D3MFormatError(f"{WHERE}: at most one of {list(SIGMA_SCHEDULES)} may be true")


def _check_value(key: str, value, config: dict) -> None:
    kind, allowed = CONFIG_RULES[key]
    if kind.endswith("?"):
        if value is None:
            return
        kind = kind[:-1]
    if kind == "bool":
        if not isinstance(value, bool):
            raise _fail(key, "true or false", value)
    elif kind == "int":
        if not _is_int(value) or not allowed[0] <= value <= allowed[1]:
            raise _fail(key, f"an integer in {allowed[0]}..{allowed[1]}", value)
    elif kind == "num":
        if not _is_num(value) or not allowed[0] <= value <= allowed[1]:
            raise _fail(key, f"a number in [{allowed[0]}, {allowed[1]}]", value)
    elif kind == "choice":
        if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
            raise _fail(key, f"one of {list(allowed)}", value)
    elif kind == "null":
        if value is not None:
            raise _fail(key, "null", value)
    elif kind == "betas":
        n = config.get("num_train_timesteps", 1000)
        ok = value is None or (
            isinstance(value, list) and len(value) == n and all(_is_num(b) and 0 <= b <= 0.999 for b in value)
        )
        if not ok:
            raise _fail(key, f"null or a list of num_train_timesteps ({n}) numbers in [0, 0.999]", value)
    elif kind == "ints":
        ok = isinstance(value, list) and len(value) <= MAX_CONFIG_LIST
        if not (ok and all(_is_int(v) and 0 <= v < MAX_CONFIG_LIST for v in value)):
            raise _fail(key, f"a list of at most {MAX_CONFIG_LIST} integers in 0..{MAX_CONFIG_LIST - 1}", value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fail(key: str, wanted: str, value) -> D3MFormatError:
    return D3MFormatError(f"{WHERE}.{key} must be {wanted}, got {value!r}"[:500])

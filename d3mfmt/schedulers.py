"""What the manifest's ``generator`` section may name: pipelines, schedulers, scheduler configs.

spec/SPEC.md ("Scheduler config") is the authority. ``SCHEDULER_KEYS`` states,
for each allowed scheduler, every key it may carry and the values of that key
that render; ``check_scheduler_config`` (run by ``d3m-inspect check``) adds the rules that join keys and the
step count. A key not in a scheduler's table is refused (its diffusers might
ignore it, or a later one use it, and draw other images than the writer did);
so is every private ``_`` key (diffusers' ``_use_default_values`` would make
``from_config`` drop the stated values). The values were measured with real
diffusers schedulers: whatever passes here runs every step to finite latents
(tests/test_render_rules.py renders them, and fuzzes the table).

Example:
    >>> check_scheduler_config("DDIMScheduler", {"num_train_timesteps": 1000}, steps=50)
    >>> check_scheduler_config("DDIMScheduler", {"beta_schedule": "cosine"}, steps=50)
    Traceback (most recent call last):
    ...
    d3mfmt.errors.D3MFormatError: manifest.json: generator.scheduler.config.beta_schedule must be one of 'linear', 'scaled_linear', got 'cosine'
"""

from __future__ import annotations

import math

from .errors import D3MFormatError

PIPELINES = ("StableDiffusionPipeline",)
TRAIN_TIMESTEPS = 1000  # every SD-family UNet is trained on 1,000 timesteps; others feed it timesteps it never saw
MAX_SIGMA_SCHEDULE_STEPS = 250  # Karras/exponential sigmas in the multistep solvers repeat timesteps (IndexError) near 1,000

# Value rules: ("bool", ()), ("int", (lo, hi)), ("num", (lo, hi)), ("choice", values), ("null", ()),
# ("ints", ()) a list of step indices. A value of "choice" matches by type as well (False is not 0).
BOOL, NULL = ("bool", ()), ("null", ())
FALSE, TRUE = ("choice", (False,)), ("choice", (True,))
RATIO, POSITIVE = ("num", (1e-6, 1.0)), ("num", (1e-6, 1e6))
SPACINGS = ("leading", "trailing", "linspace")
COMMON = {
    "num_train_timesteps": ("int", (TRAIN_TIMESTEPS, TRAIN_TIMESTEPS)),  # 10: non-finite latents from a real UNet
    "beta_start": ("num", (1e-5, 0.02)),  # and beta_start <= beta_end: the SD (0.00085..0.012) and DDPM (1e-4..0.02) ranges
    "beta_end": ("num", (1e-5, 0.02)),
    "beta_schedule": ("choice", ("linear", "scaled_linear")),  # squaredcos_cap_v2 crashes multistep solvers' sigma schedules
    "trained_betas": NULL,
    "prediction_type": ("choice", ("epsilon", "v_prediction", "sample")),
    "timestep_spacing": ("choice", SPACINGS),
    "steps_offset": ("int", (0, TRAIN_TIMESTEPS - 1)),
}
THRESHOLDING = {"thresholding": BOOL, "dynamic_thresholding_ratio": RATIO, "sample_max_value": POSITIVE}
SIGMAS = {"use_karras_sigmas": BOOL, "use_exponential_sigmas": BOOL,
          "use_beta_sigmas": FALSE}  # beta sigmas need scipy, which a consumer may not have
FLOW = {"use_flow_sigmas": FALSE, "flow_shift": POSITIVE,  # flow sigmas are for flow-matching models, not SD
        "use_dynamic_shifting": FALSE,  # needs a per-call `mu` the regeneration rule does not pass
        "time_shift_type": ("choice", ("exponential", "linear"))}
MULTISTEP = {**COMMON, **THRESHOLDING, **SIGMAS, **FLOW, "solver_order": ("int", (1, 2)),  # 3: non-finite latents with Karras sigmas
             "lower_order_final": BOOL}

# scheduler class -> {key: rule}. Deterministic schedulers only: ancestral and SDE samplers draw fresh
# noise every step, which would make the seeds meaningless. LMSDiscreteScheduler needs scipy (refused).
SCHEDULER_KEYS: dict[str, dict[str, tuple]] = {
    "DDIMScheduler": {**COMMON, **THRESHOLDING, "clip_sample": BOOL, "clip_sample_range": POSITIVE,
                      "set_alpha_to_one": BOOL, "rescale_betas_zero_snr": FALSE},
    "PNDMScheduler": {**COMMON, "prediction_type": ("choice", ("epsilon", "v_prediction")),
                      "skip_prk_steps": BOOL, "set_alpha_to_one": BOOL},
    "EulerDiscreteScheduler": {**COMMON, **SIGMAS, "interpolation_type": ("choice", ("linear", "log_linear")),
                               "sigma_min": NULL, "sigma_max": NULL,
                               "timestep_type": ("choice", ("discrete", "continuous")),
                               "rescale_betas_zero_snr": FALSE, "final_sigmas_type": ("choice", ("zero", "sigma_min"))},
    "HeunDiscreteScheduler": {**COMMON, **SIGMAS, "clip_sample": BOOL, "clip_sample_range": POSITIVE},
    "DPMSolverMultistepScheduler": {**MULTISTEP, "algorithm_type": ("choice", ("dpmsolver++",)),  # "dpmsolver": see SPEC
                                    "solver_type": ("choice", ("midpoint", "heun")), "euler_at_final": BOOL,
                                    "use_lu_lambdas": BOOL, "final_sigmas_type": ("choice", ("zero", "sigma_min")),
                                    "variance_type": NULL,  # learned variance needs 2x output channels
                                    "rescale_betas_zero_snr": FALSE},
    "DEISMultistepScheduler": {**MULTISTEP, "algorithm_type": ("choice", ("deis",)),
                               "solver_type": ("choice", ("logrho",))},
    "UniPCMultistepScheduler": {**MULTISTEP, "predict_x0": TRUE,  # false: non-finite latents
                                "solver_type": ("choice", ("bh1", "bh2")), "disable_corrector": ("ints", ()),
                                "solver_p": NULL, "final_sigmas_type": ("choice", ("zero", "sigma_min")),
                                "rescale_betas_zero_snr": FALSE, "sigma_min": NULL, "sigma_max": NULL,
                                "shift_terminal": NULL},  # needs flow sigmas
}
SCHEDULERS = tuple(SCHEDULER_KEYS)
MULTISTEP_SCHEDULERS = ("DPMSolverMultistepScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler")
# diffusers' defaults for the keys the cross-key rules read (absent key = this value)
DEFAULTS = {"timestep_spacing": "linspace", "steps_offset": 0, "num_train_timesteps": 1000, "beta_start": 0.0001,
            "beta_end": 0.02, "skip_prk_steps": False, "final_sigmas_type": "zero",
            "lower_order_final": True, "solver_type": None}
SCHEDULER_DEFAULTS = {"DDIMScheduler": {"timestep_spacing": "leading"}, "PNDMScheduler": {"timestep_spacing": "leading"},
                      "HeunDiscreteScheduler": {"beta_start": 0.00085, "beta_end": 0.012}}
SIGMA_SCHEDULES = ("use_karras_sigmas", "use_exponential_sigmas", "use_lu_lambdas")  # at most one may be true
WHERE = "manifest.json: generator.scheduler.config"


def setting(scheduler: str, config: dict, key: str):
    """``config[key]``, or the scheduler's own default for a key the cross-key rules read."""
    if key in config:
        return config[key]
    return SCHEDULER_DEFAULTS.get(scheduler, {}).get(key, DEFAULTS[key])


def check_scheduler_config(scheduler: str, config: dict, steps: int) -> None:
    """Raise D3MFormatError unless ``config`` renders with ``scheduler`` at ``steps`` steps (SPEC "Scheduler config")."""
    if scheduler not in SCHEDULER_KEYS:
        raise D3MFormatError(
            f"manifest.json: generator.scheduler.class must be a deterministic scheduler, one of {list(SCHEDULERS)}, "
            f"got {scheduler!r}"[:500]
        )
    if not isinstance(config, dict):
        raise D3MFormatError(f"{WHERE} must be an object, got {type(config).__name__}")
    rules = SCHEDULER_KEYS[scheduler]
    # 1. every key is one this scheduler takes, with a value that renders
    for key, value in config.items():
        if isinstance(key, str) and key.startswith("_"):
            raise D3MFormatError(
                f"{WHERE} has the private key {key!r}; diffusers' bookkeeping keys (_use_default_values would drop "
                "the stated values) must not be stored: write the config without '_' keys"[:500]
            )
        if key not in rules:
            raise D3MFormatError(
                f"{WHERE} has key {key!r}, which {scheduler} does not take in format 1.0; a renderer might ignore it "
                f"and draw different images. Keys {scheduler} may carry: {sorted(rules)}"[:900]
            )
        _check_value(key, rules[key], value)
    # 2. the rules that join keys and the step count
    _check_steps(scheduler, config, steps)
    if setting(scheduler, config, "beta_start") > setting(scheduler, config, "beta_end"):
        raise _fail("beta_start", f"at most beta_end ({setting(scheduler, config, 'beta_end')})",
                    setting(scheduler, config, "beta_start"))
    if sum(config.get(k) is True for k in SIGMA_SCHEDULES) > 1:
        raise D3MFormatError(f"{WHERE}: at most one of {list(SIGMA_SCHEDULES)} may be true")
    zero_final = setting(scheduler, config, "final_sigmas_type") == "zero"
    sigma_schedule = any(config.get(k) is True for k in SIGMA_SCHEDULES)
    if (scheduler == "DPMSolverMultistepScheduler" and config.get("solver_type") == "heun" and not zero_final
            and sigma_schedule and config.get("euler_at_final") is not True):  # the last two sigmas coincide
        raise _fail("euler_at_final", "true for solver_type 'heun' with final_sigmas_type 'sigma_min' and Karras, "
                    "exponential or Lu sigmas (non-finite latents otherwise)", config.get("euler_at_final", False))
    if scheduler == "UniPCMultistepScheduler" and zero_final:  # both step onto sigma 0 to non-finite latents
        if setting(scheduler, config, "lower_order_final") is False:
            raise _fail("lower_order_final", "true unless final_sigmas_type is 'sigma_min'", False)
        if config.get("solver_type") == "bh1":
            raise _fail("solver_type", "'bh2' unless final_sigmas_type is 'sigma_min'", "bh1")


def _check_steps(scheduler: str, config: dict, steps: int) -> None:
    """The timestep grid for ``steps`` steps exists and stays inside ``num_train_timesteps``."""
    timesteps = setting(scheduler, config, "num_train_timesteps")
    multistep = scheduler in MULTISTEP_SCHEDULERS
    if steps > timesteps or (multistep and steps >= timesteps):
        bound = f"below {timesteps}" if multistep else f"at most {timesteps}"
        raise D3MFormatError(f"manifest.json: generator.steps {steps} must be {bound}, the scheduler's "
                             f"num_train_timesteps ({scheduler} {'spaces steps + 1 points' if multistep else 'steps'})")
    # "leading" spacing adds steps_offset to every timestep; the largest must stay below num_train_timesteps
    offset = setting(scheduler, config, "steps_offset")
    if setting(scheduler, config, "timestep_spacing") == "leading":
        top = steps * (timesteps // (steps + 1)) if multistep else (steps - 1) * (timesteps // steps)
        if (multistep and timesteps // (steps + 1) < 1) or offset + top >= timesteps:
            raise _fail("steps_offset", f"small enough that the last of {steps} 'leading' timesteps ({top} + offset) "
                        f"stays below num_train_timesteps ({timesteps})", offset)
    if scheduler == "PNDMScheduler" and not setting(scheduler, config, "skip_prk_steps") and steps < 4:
        raise D3MFormatError(f"manifest.json: generator.steps {steps} is too few for PNDMScheduler's Runge-Kutta "
                             "warm-up (at least 4, or set skip_prk_steps true)")
    if multistep and steps > MAX_SIGMA_SCHEDULE_STEPS and any(config.get(k) is True for k in SIGMA_SCHEDULES[:2]):
        raise D3MFormatError(f"manifest.json: generator.steps {steps} exceeds {MAX_SIGMA_SCHEDULE_STEPS}, the most "
                             f"{scheduler} renders with Karras or exponential sigmas (more repeat timesteps)")


def unet_evaluations(scheduler: str, config: dict, steps: int) -> int:
    """UNet calls per image for one branch (SPEC "Render cost"): Heun 2 per step, PNDM its warm-up, else 1 per step."""
    if scheduler == "HeunDiscreteScheduler":
        return 2 * steps - 1
    if scheduler == "PNDMScheduler":
        return steps + 1 if setting(scheduler, config, "skip_prk_steps") else steps + 9
    return steps


def _check_value(key: str, rule: tuple, value) -> None:
    kind, allowed = rule
    if kind == "bool":
        ok = isinstance(value, bool)
        wanted = "true or false"
    elif kind == "int":
        ok = _is_int(value) and allowed[0] <= value <= allowed[1]
        wanted = f"an integer in {allowed[0]}..{allowed[1]}"
    elif kind == "num":
        ok = _is_num(value) and allowed[0] <= value <= allowed[1]
        wanted = f"a number in [{allowed[0]}, {allowed[1]}]"
    elif kind == "choice":
        ok = any(type(value) is type(a) and value == a for a in allowed)
        wanted = f"one of {', '.join(_json(a) for a in allowed)}" if len(allowed) > 1 else _json(allowed[0])
    elif kind == "null":
        ok, wanted = value is None, "null"
    else:  # "ints": step indices
        ok = isinstance(value, list) and len(value) <= TRAIN_TIMESTEPS
        ok = ok and all(_is_int(v) and 0 <= v < TRAIN_TIMESTEPS for v in value)
        wanted = f"a list of at most {TRAIN_TIMESTEPS} integers in 0..{TRAIN_TIMESTEPS - 1}"
    if not ok:
        raise _fail(key, wanted, value)


def _json(value) -> str:
    return "true" if value is True else "false" if value is False else repr(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value) -> bool:
    return _is_int(value) or isinstance(value, float) and math.isfinite(value)


def _fail(key: str, wanted: str, value) -> D3MFormatError:
    return D3MFormatError(f"{WHERE}.{key} must be {wanted}, got {value!r}"[:500])

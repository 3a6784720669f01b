"""A job's engine steps: where each UNet call is made and which member step it belongs to.

The batching engine makes one UNet call per engine step for every row. A member's step with a
second-order sampler (Heun, DPM2, DPM2 a, DPM++ SDE) needs two model evaluations, so it is two
engine steps: stage 0 evaluates at the step's own sigma and moves the row to a trial point; stage 1
evaluates there and completes the step. A :class:`Plan` lists, per engine step, the sigma to
evaluate at and the member step it serves, plus the constants a sampler needs there (LMS's
coefficients), all made once per job on the CPU so that a step reads them on the device by index.

The scalar arithmetic here is k-diffusion's own, on the same float32 values in the same order: the
Brownian tree of the SDE samplers is queried at these sigmas, and a query a rounding away from
k-diffusion's would give noticeably different noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from engine.sampling.sampler_steps import ancestral_split

#: Columns of :attr:`Plan.table`: the sigma the model is evaluated at, the member step's start and
#: end, the stage-1 evaluation sigma (both stages carry it), the stage (0 or 1), and the step's
#: coefficients for a multistep sampler (LMS uses 4, UniPC 10).
EVAL, FROM, TO, MID, STAGE = range(5)
N_COEFFS = 10
COEFFS = slice(5, 5 + N_COEFFS)
COLUMNS = 5 + N_COEFFS
LMS_ORDER = 4


@dataclass(frozen=True)
class Plan:
    """One job's engine steps (the same for all of its images)."""

    table: Tensor  # [engine steps, COLUMNS] float32, on the CPU
    noise: tuple[tuple[float, float] | None, ...]  # per engine step: the sigma interval its fresh noise spans
    completes: tuple[bool, ...]  # per engine step: whether it finishes one of the member's steps

    @property
    def engine_steps(self) -> int:
        return self.table.shape[0]


def _row(eval_sigma, sigma, sigma_next, mid, stage: int, coeffs=()) -> list[float]:
    coeffs = [float(c) for c in coeffs] + [0.0] * (N_COEFFS - len(coeffs))
    return [float(eval_sigma), float(sigma), float(sigma_next), float(mid), float(stage), *coeffs]


def _plan(rows: list[list[float]], noise: list, completes: list[bool]) -> Plan:
    return Plan(torch.tensor(rows, dtype=torch.float32).view(-1, COLUMNS), tuple(noise), tuple(completes))


def one_stage_plan(sigmas: Tensor, noise: str = "none", coeffs: list | None = None) -> Plan:
    """One UNet call per member step. ``noise``: "none", "every" step (Euler a draws even on its last,
    where the noise is scaled by 0) or "until_last" (not on the step that ends at sigma 0)."""
    rows, intervals = [], []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        rows.append(_row(sigma, sigma, sigma_next, sigma_next, 0, coeffs[i] if coeffs else ()))
        wanted = noise == "every" or (noise == "until_last" and sigma_next > 0)
        intervals.append((float(sigma), float(sigma_next)) if wanted else None)
    return _plan(rows, intervals, [True] * len(rows))


def two_stage_plan(sigmas: Tensor, mid_of, noise_of=None) -> Plan:
    """Two UNet calls per member step except the last (to sigma 0), which is one Euler step.

    ``mid_of(sigma, sigma_next)``: where stage 1 evaluates; ``noise_of(sigma, sigma_next)``: the noise
    intervals of stage 0 and stage 1 (each None for no noise).
    """
    rows, intervals, completes = [], [], []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if sigma_next == 0:
            rows.append(_row(sigma, sigma, sigma_next, sigma_next, 0))
            intervals.append(None)
            completes.append(True)
            continue
        mid = mid_of(sigma, sigma_next)
        first, second = noise_of(sigma, sigma_next) if noise_of else (None, None)
        rows += [_row(sigma, sigma, sigma_next, mid, 0), _row(mid, sigma, sigma_next, mid, 1)]
        intervals += [first, second]
        completes += [False, True]
    return _plan(rows, intervals, completes)


# ---------------------------------------------------------------------------- the staged samplers' plans


def ancestral_levels(sigma: Tensor, sigma_next: Tensor) -> tuple[Tensor, Tensor]:
    """k-diffusion's get_ancestral_step (eta 1) on scalars: (sigma_down, sigma_up)."""
    sigma_up = torch.minimum(sigma_next, (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def log_midpoint(a: Tensor, b: Tensor) -> Tensor:
    """The geometric mean of two sigmas, as k-diffusion computes DPM-Solver-2's midpoint."""
    return a.log().lerp(b.log(), 0.5).exp()


def heun_plan(sigmas: Tensor) -> Plan:
    return two_stage_plan(sigmas, lambda sigma, sigma_next: sigma_next)


def dpm2_plan(sigmas: Tensor) -> Plan:
    return two_stage_plan(sigmas, log_midpoint)


def dpm2_ancestral_plan(sigmas: Tensor) -> Plan:
    # The step goes to sigma_down, then noise brings it to sigma_next; the midpoint is toward sigma_down.
    return two_stage_plan(
        sigmas,
        lambda sigma, sigma_next: log_midpoint(sigma, ancestral_levels(sigma, sigma_next)[0]),
        lambda sigma, sigma_next: (None, (float(sigma), float(sigma_next))),
    )


def dpmpp_sde_times(sigma: Tensor, sigma_next: Tensor, r: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """DPM-Solver++ (stochastic)'s levels in k-diffusion's order: (sigma_fn(t), sigma_fn(s), sigma_fn(t_next))."""
    t, t_next = sigma.log().neg(), sigma_next.log().neg()
    s = t + (t_next - t) * r
    return t.neg().exp(), s.neg().exp(), t_next.neg().exp()


def dpmpp_sde_plan(sigmas: Tensor) -> Plan:
    def noise_of(sigma, sigma_next):
        here, mid, there = (float(v) for v in dpmpp_sde_times(sigma, sigma_next))
        return (here, mid), (here, there)

    return two_stage_plan(sigmas, lambda sigma, sigma_next: dpmpp_sde_times(sigma, sigma_next)[1], noise_of)


def euler_ancestral_plan(sigmas: Tensor) -> Plan:
    """Euler a's split of each step into sigma_down and sigma_up, made here once (float32, the
    arithmetic the step made per row before) instead of by every step on the device."""
    sigma, sigma_next = sigmas[:-1].float(), sigmas[1:].float()
    down, up = ancestral_split(sigma, sigma_next)
    return one_stage_plan(sigmas, noise="every", coeffs=torch.stack([down - sigma, up], 1).tolist())


# ---------------------------------------------------------------------------- LMS


def lms_coefficients(sigmas: Tensor, order: int = LMS_ORDER) -> list[list[float]]:
    """Per step i, the weights of d_i, d_(i-1), ... in the linear multistep update (k-diffusion's
    linear_multistep_coeff), integrating the Lagrange basis polynomials exactly in float64."""
    t = sigmas.double().numpy()
    out = []
    for i in range(len(t) - 1):
        current = min(i + 1, order)
        weights = []
        for j in range(current):
            others = [t[i - k] for k in range(current) if k != j]
            basis = np.poly1d(np.poly(others)) / np.prod([t[i - j] - other for other in others])
            antiderivative = basis.integ()
            weights.append(float(antiderivative(t[i + 1]) - antiderivative(t[i])))
        out.append(weights + [0.0] * (order - current))
    return out


def lms_plan(sigmas: Tensor) -> Plan:
    return one_stage_plan(sigmas, coeffs=lms_coefficients(sigmas))


# ---------------------------------------------------------------------------- UniPC

UNIPC_ORDER = 3  # AUTOMATIC1111's defaults: order 3, variant bh1, lower order on the final steps


def _unipc_weights(
    lambdas: np.ndarray, k: int, order: int, variant: str
) -> tuple[float, float, np.ndarray, np.ndarray, np.ndarray]:
    """UniPC's B(h) update from step k to k + 1 (Zhao et al. 2023, as diffusers'
    UniPCMultistepScheduler computes it): h*phi_1, B(h), the ratios r_i of the earlier steps, and
    the solutions rho of the predictor (order - 1 weights) and of the corrector (order weights)."""
    h = lambdas[k + 1] - lambdas[k]
    hh = -h  # data prediction
    h_phi_1 = np.expm1(hh)
    b_h = hh if variant == "bh1" else np.expm1(hh)
    rks = np.array([(lambdas[k - i] - lambdas[k]) / h for i in range(1, order)] + [1.0])
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    big_r, b = np.stack([rks ** (i - 1) for i in range(1, order + 1)]), np.array(b)
    rhos_p = np.array([0.5]) if order == 2 else np.linalg.solve(big_r[:-1, :-1], b[:-1]) if order > 2 else np.zeros(0)
    rhos_c = np.array([0.5]) if order == 1 else np.linalg.solve(big_r, b)
    return h_phi_1, b_h, rks[:-1], rhos_p, rhos_c


def unipc_coefficients(sigmas: Tensor, order: int = UNIPC_ORDER, variant: str = "bh1") -> list[list[float]]:
    """Per step k, UniPC as two linear combinations (the corrector, then the predictor):

    corrected = c0 x + c1 x_last + c2 D_k + c3 D_(k-1) + c4 D_(k-2) + c5 D_(k-3)
    x_next = c6 corrected + c7 D_k + c8 D_(k-1) + c9 D_(k-2)

    where x is the point the model was evaluated at, x_last the previous step's corrected point and
    D the denoised images. In k-diffusion's variables (x / alpha) the VP formulas lose their alphas:
    lambda = -log(sigma). All of it depends only on the job's sigmas, so it is made here once.
    """
    s = sigmas.double().numpy()
    n = len(s) - 1
    lambdas = -np.log(np.where(s > 0, s, np.nan))
    orders = [min(order, n - k, k + 1) for k in range(n)]  # warm-up, and lower order at the end
    out = []
    for k in range(n):
        corrector = [1.0, 0, 0, 0, 0, 0]
        if k > 0:  # corrects the previous predictor with D_k, at the previous step's order
            c = orders[k - 1]
            h_phi_1, b_h, rks, _, rhos_c = _unipc_weights(lambdas, k - 1, c, variant)
            corrector = [
                0.0,
                s[k] / s[k - 1],
                -b_h * rhos_c[-1],
                -h_phi_1 + b_h * (sum(rhos_c[i] / rks[i] for i in range(c - 1)) + rhos_c[-1]),
            ]
            corrector += [-b_h * rhos_c[i] / rks[i] for i in range(c - 1)] + [0.0] * (3 - c)
        if s[k + 1] == 0:  # the last step lands on the denoised image
            predictor = [0.0, 1.0, 0.0, 0.0]
        else:
            p = orders[k]
            h_phi_1, b_h, rks, rhos_p, _ = _unipc_weights(lambdas, k, p, variant)
            predictor = [s[k + 1] / s[k], -h_phi_1 + b_h * sum(rhos_p[i] / rks[i] for i in range(p - 1))]
            predictor += [-b_h * rhos_p[i] / rks[i] for i in range(p - 1)] + [0.0] * (3 - p)
        out.append([float(v) for v in corrector + predictor])
    return out


def unipc_plan(sigmas: Tensor) -> Plan:
    return one_stage_plan(sigmas, coeffs=unipc_coefficients(sigmas))

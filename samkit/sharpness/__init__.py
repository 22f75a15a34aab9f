"""Measuring flatness: Hessian eigenvalues, trace and spectrum, m-sharpness, loss landscapes."""

from samkit.sharpness.density import Spectrum, hessian_spectrum
from samkit.sharpness.eigenvalues import EigenInfo, hessian_eigenvalues
from samkit.sharpness.hvp import HessianOperator
from samkit.sharpness.landscape import Landscape, loss_landscape
from samkit.sharpness.m_sharpness import m_sharpness
from samkit.sharpness.plotting import plot_landscapes
from samkit.sharpness.report import flatness_report
from samkit.sharpness.trace import hessian_trace

__all__ = [
    "EigenInfo",
    "HessianOperator",
    "Landscape",
    "Spectrum",
    "flatness_report",
    "hessian_eigenvalues",
    "hessian_spectrum",
    "hessian_trace",
    "loss_landscape",
    "m_sharpness",
    "plot_landscapes",
]

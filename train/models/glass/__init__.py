"""GLASS: a discriminator trained against global anomaly synthesis (gradient ascent in feature space)."""

from edgeinspect.train.models.glass.model import GLASS, project_to_ring, synthesize_anomalies

__all__ = ["GLASS", "project_to_ring", "synthesize_anomalies"]

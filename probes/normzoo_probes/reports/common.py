"""What several probes' reports share: medians over every layer of per-layer list fields."""

from __future__ import annotations

from normzoo.probe_report import Config, ProbeReport, Records, is_number, median


def layer_values(records: Records, field: str) -> list[float]:
    """|value| of every layer at every measurement (a layer's sign, say of a cosine drift, is not its size)."""
    return [abs(v) for record in records for v in record.get(field) or [] if is_number(v)]


class PerLayerReport(ProbeReport):
    """Adds to the generic summary ``<probe>_<field>_median``: the median of |value| over layers and measurements
    of each per-layer list field in ``per_layer``."""

    per_layer: tuple[str, ...] = ()

    def summarize(self, records: Records, config: Config | None) -> dict[str, float]:
        return super().summarize(records, config) | {self.key(field): median(layer_values(records, field))
                                                     for field in self.per_layer}

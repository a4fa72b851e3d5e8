"""mr2ct: 3D CycleGANs that translate MRI into synthetic CT (README)."""

from mr2ct.monai_import import install as _skip_unused_monai_integrations

_skip_unused_monai_integrations()

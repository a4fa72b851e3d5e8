"""Judging translations: bone segmentation, SynthRAD metrics, mode-collapse diagnostics, three-plane pictures."""

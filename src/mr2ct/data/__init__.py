"""Data: the embedded spine phantom, NIfTI folders, MONAI transform chains."""

from mr2ct.data.datamodules import CycleGANDataModule, NiftiDataModule, PhantomDataModule, TrainPatches

__all__ = ["CycleGANDataModule", "NiftiDataModule", "PhantomDataModule", "TrainPatches"]

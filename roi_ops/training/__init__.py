"""Training ROICtrl adapters: data preparation and the trainer behind ``roi-ops train``."""

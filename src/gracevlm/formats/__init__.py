"""Pure tensor and file code: on-disk layouts and their exact conversions (no model code here)."""

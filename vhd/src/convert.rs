//! Conversion between formats (placeholder).

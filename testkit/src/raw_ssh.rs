//! A minimal SSH server below russh (placeholder).

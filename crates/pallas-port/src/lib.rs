//! pallas-port crate.

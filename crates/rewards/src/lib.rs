//! Placeholder: see README.md for what this crate will hold and which issue brings it.

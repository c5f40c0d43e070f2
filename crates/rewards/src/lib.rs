//! Empty until its issue (#5) lands: see this crate's README.md for what
//! will live here.

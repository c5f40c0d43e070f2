//! Empty until its issue (#4) lands: see this crate's README.md for what
//! will live here.

//! Empty until its issue (#7) lands: see this crate's README.md for what
//! will live here.

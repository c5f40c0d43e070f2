//! Empty until its issue (#6) lands: see this crate's README.md for what
//! will live here.

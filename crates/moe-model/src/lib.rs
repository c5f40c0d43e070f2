//! Empty until its issue (#3) lands: see this crate's README.md for what
//! will live here.

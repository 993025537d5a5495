//! The derive's tests: what it generates for the enums it accepts (checked
//! against serde's own output and through `annals`' encoder and decoder), and
//! the compile errors for the enums it refuses.

mod compile_fail;
mod pass;

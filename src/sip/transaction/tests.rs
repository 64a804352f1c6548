//! Virtual-time tests of the transaction core.

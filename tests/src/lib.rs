//! Workspace-level test support: the seeded simulator of an agreement cluster
//! ([`sim`]), its Byzantine replicas ([`byzantine`]) and the safety and
//! linearizability checker ([`checker`]). The scenarios live in `tests/tests/`.

pub mod byzantine;
pub mod checker;
pub mod exec_sim;
pub mod sim;

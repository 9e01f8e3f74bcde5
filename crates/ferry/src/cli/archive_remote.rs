//! The agent's side of `ferry archive`: archives of live volumes,
//! workloads and shares, restores into a volume, imports of images, each
//! a job in the agent whose progress the CLI shows.

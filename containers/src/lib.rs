//! edgetwin container agent: runtime connector, commands, declarative reconcile (being written).

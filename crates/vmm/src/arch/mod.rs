//! Architecture-specific setup. twinvm runs on x86_64 hosts only.

pub mod x86_64;

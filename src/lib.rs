pub mod demo;
pub mod ring;

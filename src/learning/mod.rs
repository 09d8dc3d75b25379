//! Learning from outcomes: the weight tuner (ACK rates per signal type) and the
//! availability prediction (ACK history by hour of day).

pub mod prediction;
pub mod tuning;

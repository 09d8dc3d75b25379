//! `<p>/bids`: a BidSubmission.

use serde::{Deserialize, Serialize};

use super::fields::*;
use super::*;

/// A demand-response bid, validated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BidSubmission {
    /// The bidder's request id.
    pub request_id: String,
    /// Who bids.
    pub participant: String,
    /// The program bid into.
    pub program: String,
    /// Price, per MW, >= 0.
    pub price_per_mw: f64,
    /// Smallest acceptable award, MW, > 0.
    pub min_mw: f64,
    /// Largest award, MW, >= `min_mw`.
    pub max_mw: f64,
    /// Window start.
    pub start: Timestamp,
    /// Window end, after `start`, in the future.
    pub end: Timestamp,
    /// Delivery reliability, 0..=1.
    pub reliability: f64,
}

pub(super) fn decode_bid(o: &Obj, now: Timestamp) -> Result<BidSubmission, InputError> {
    let request_id = o.id("request_id")?;
    let participant = o.id("participant")?;
    let program = o.id("program")?;
    let price_per_mw = non_negative("price_per_mw", o.num("price_per_mw")?)?;
    let min_mw = positive("min_mw", o.num("min_mw")?)?;
    let max_mw = o.num("max_mw")?;
    if max_mw < min_mw {
        return Err(invalid("max_mw", format!("must be >= min_mw ({min_mw}), got {max_mw}")));
    }
    let start = o.time("start")?;
    let end = o.time("end")?;
    if end <= start {
        return Err(invalid("end", format!("must be after start ({start}), got {end}")));
    }
    if end <= now {
        return Err(invalid("end", format!("must be in the future, got {end}")));
    }
    let reliability = fraction("reliability", o.num("reliability")?)?;
    Ok(BidSubmission { request_id, participant, program, price_per_mw, min_mw, max_mw, start, end, reliability })
}

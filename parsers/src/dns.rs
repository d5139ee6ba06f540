//! DNS messages (issue 6; being written).

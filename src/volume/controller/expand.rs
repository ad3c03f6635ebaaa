//! ControllerExpandVolume: grow the image; never shrink it.

use super::{size_for, Controller};
use crate::ceph::pool::with_ioctx;
use crate::volume::Error;
use std::collections::HashMap;

impl Controller {
    pub async fn expand_volume(
        &self,
        volume_id: &str,
        required: i64,
        limit: i64,
        secrets: &HashMap<String, String>,
    ) -> Result<u64, Error> {
        let id = self.decode_existing(volume_id)?;
        let size = size_for(required, limit)?;
        let creds = self.creds(secrets)?;
        let _guard = self
            .inflight
            .try_enter(volume_id)
            .ok_or_else(|| Error::aborted_in_flight(volume_id))?;
        let io = self.volume_ioctx(&id, &creds).await?;
        let image = id.image.clone();
        with_ioctx(io, move |io| {
            let img = io.open_image(&image)?;
            let cur = img.size()?;
            if size > cur {
                img.resize(size)?;
                Ok(size)
            } else {
                Ok(cur)
            }
        })
        .await
        .map_err(Error::ceph(format!("expanding {}", id.image)))
    }
}

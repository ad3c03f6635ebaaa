//! ControllerExpandVolume: grow the image; never shrink it.

use super::{size_for, Controller};
use crate::ceph::pool::with_ioctx;
use crate::volume::Error;
use std::collections::HashMap;
use std::sync::Arc;

impl Controller {
    pub async fn expand_volume(
        self: &Arc<Self>,
        volume_id: &str,
        required: i64,
        limit: i64,
        secrets: &HashMap<String, String>,
    ) -> Result<u64, Error> {
        let id = self.decode_existing(volume_id)?;
        let size = size_for(required, limit)?;
        let creds = self.creds(secrets)?;
        self.run_owned(volume_id, move |this| async move {
            let io = this.volume_ioctx(&id, &creds).await?;
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
        })
        .await
    }
}

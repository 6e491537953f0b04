"""Container images of the pipeline (declared here, built by flytekit/ImageSpec or the Dockerfiles beside it)."""

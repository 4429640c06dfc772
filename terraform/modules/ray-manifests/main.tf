/**
 * Renders the Kubernetes manifests of infra/k8s for the Ray deployment.
 *
 * Provider-free on purpose: it only reads files and transforms YAML, so the
 * tests evaluate it with the real terraform binary, offline, and validate
 * exactly what modules/ray applies.
 *
 * The RayService keeps the Ingress deployment and one Model_<name> deployment
 * for each entry of var.models, in that order; the sizing of each comes from
 * the manifest. TRIGGERFISH_MODELS carries the same list to the application,
 * so the application and the Serve config always name the same deployments.
 * var.model_autoscaling overrides a model's min_replicas and
 * downscale_to_zero_delay_s (scale to zero and its idle delay); fields left
 * null keep the manifest's values.
 */

locals {
  values = merge(var.template_vars, { models = join(",", var.models) })

  rendered = { for name in var.plain_templates : name => templatefile("${var.manifests_dir}/${name}.yaml", local.values) }
  secrets  = { for name in var.secret_templates : name => templatefile("${var.manifests_dir}/${name}.yaml", merge(local.values, var.secret_vars)) }

  rayservice_template = yamldecode(templatefile("${var.manifests_dir}/rayservice.yaml", local.values))
  serve_config        = yamldecode(local.rayservice_template.spec.serveConfigV2)
  application         = one(local.serve_config.applications)

  sized_deployments = { for deployment in local.application.deployments : deployment.name => deployment }
  wanted_names      = concat(["Ingress"], [for model in var.models : "Model_${model}"])
  unsized_names     = [for name in local.wanted_names : name if !contains(keys(local.sized_deployments), name)]
  overrides = {
    for model, scaling in var.model_autoscaling : "Model_${model}" => {
      for field, value in scaling : field => value if value != null
    }
  }
  unknown_models = [for model in keys(var.model_autoscaling) : model if !contains(var.models, model)]
  # A floor above the ceiling would make Serve refuse the whole application.
  sized_overrides = { for name, scaling in local.overrides : name => scaling if contains(keys(local.sized_deployments), name) }
  floors_above_ceiling = [
    for name, scaling in local.sized_overrides : name
    if lookup(scaling, "min_replicas", 0) > tonumber(local.sized_deployments[name].autoscaling_config.max_replicas)
  ]
  deployments = [
    for name in local.wanted_names : (
      contains(keys(local.overrides), name)
      ? merge(local.sized_deployments[name], {
        autoscaling_config = merge(local.sized_deployments[name].autoscaling_config, local.overrides[name])
      })
      : local.sized_deployments[name]
    ) if contains(keys(local.sized_deployments), name)
  ]

  rayservice = merge(local.rayservice_template, {
    spec = merge(local.rayservice_template.spec, {
      serveConfigV2 = yamlencode(merge(local.serve_config, {
        applications = [merge(local.application, { deployments = local.deployments })]
      }))
    })
  })
}
